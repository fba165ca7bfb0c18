"""The decode-step driver with every kernel launch unpipelined (one stage), hints as given:
separates what Triton's pipelining changes from what an L2 hint changes."""
import sys

import dsacache.kernels.indexer as indexer
import dsacache.kernels.sparse_decode as sparse_decode


def one_stage(evict: str, num_stages: int) -> int:
    return 1


indexer.pipeline_stages = one_stage
sparse_decode.pipeline_stages = one_stage
from dsacache.kernels.decode_step import main  # noqa: E402

main(sys.argv[1:])
