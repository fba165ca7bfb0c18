source .gpurun/setup.sh >/dev/null 2>&1 || exit 1
bash .gpurun/envinfo.sh $OUT/env.txt
# the second call's five passes (the first call's five are skipped)
timeout 200 ncu --set full -k regex:topk_radix_pass --launch-skip 5 --launch-count 5 -o $OUT/topk_b64_128k python3 .gpurun/topk_ncu.py > $OUT/ncu.log 2>&1; echo "ncu rc=$?"; tail -3 $OUT/ncu.log
ncu --import $OUT/topk_b64_128k.ncu-rep --page details > $OUT/topk_details.txt 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Block Limit|Waves Per SM" $OUT/topk_details.txt | head -60
