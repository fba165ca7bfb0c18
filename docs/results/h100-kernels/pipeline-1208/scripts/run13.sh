# sparse MLA/GQA positions-ahead A/B, then the top-k A/B of run11 (no ncu); carry .gpurun and .whl
source .gpurun/setup.sh || exit 1
bash .gpurun/envinfo.sh $OUT/env.txt
timeout 200 python3 -u .gpurun/mla_ab.py sd_head:2 sd_pf2:1 sd_pf3:1 sd_pf3:2 > $OUT/mla_ab.log 2>&1; echo "mla ab rc=$?"; tail -8 $OUT/mla_ab.log
timeout 120 python3 -u .gpurun/ix_ab.py > $OUT/ix_ab.log 2>&1; echo "ix ab rc=$?"; tail -4 $OUT/ix_ab.log
timeout 150 python3 -u .gpurun/topk_ab2.py > $OUT/topk_ab2.log 2>&1; echo "ab rc=$?"; tail -22 $OUT/topk_ab2.log
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_topk.py > $OUT/gpu_tests_run13.log 2>&1; echo "tests rc=$?"; tail -2 $OUT/gpu_tests_run13.log
