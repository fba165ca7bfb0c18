"""Wall time of a fresh process that replays a trace, with the compiled loops on disk or not.

Each run is a new Python process (as every ``dsacache`` command and every sweep worker is)
that imports dsacache and replays the smallest bundled trace with the given policies:
- ``cold``: an empty numba cache folder, so every replay loop is compiled (before
  simulator/jitcache.py, every process was cold);
- ``warm``: the folder a previous process filled, so the loops are loaded.
The ratio cold / warm is the time a repeated command or a sweep worker saves. Medians of
``--repeats`` runs of each, alternating.

    python benchmarks/bench_startup.py [--policies lru,fifo,token-lru] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys
import dsacache
from dsacache.traces import SMALL_TRACE, open_trace
dsacache.replay(open_trace(SMALL_TRACE), policies=sys.argv[1].split(","))
"""


def run_once(policies: str, cache_dir: str) -> float:
    env = os.environ | {"NUMBA_CACHE_DIR": cache_dir, "DSACACHE_JIT_CACHE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, policies], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="lru,fifo,token-lru")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as keep:
        run_once(args.policies, keep)  # fills the folder the warm runs read
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as empty:
                cold.append(run_once(args.policies, empty))
            warm.append(run_once(args.policies, keep))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"replay of the small bundled trace, policies {args.policies}, fresh process each:")
    print(f"  cold (compiles):     {c:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in cold)})")
    print(f"  warm (loads loops):  {w:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in warm)})")
    print(f"  cold / warm: {c / w:.2f}x")


if __name__ == "__main__":
    main()
