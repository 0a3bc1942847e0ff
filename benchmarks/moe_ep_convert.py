"""MoE expert parallelism end to end: import at EP=N, verify at EP=N, export at EP=1, bit-exact.

    python benchmarks/moe_ep_convert.py --size qwen3_30b_a3b_4l --ep 2 --workdir /tmp/moe
    python benchmarks/moe_ep_convert.py --hf DIR --ep 2 --workdir /tmp/moe   # an existing folder

Runs on CPU (gloo) or GPUs (NCCL, one rank per GPU). Prints wall times and the verify report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="qwen3_30b_a3b_4l")
    p.add_argument("--hf", default=None, help="use this HF folder instead of writing one")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--workdir", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CI", "1")

    from vlm_bridge.loading import export_hf, import_hf
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.testing.checks import checkpoint_mismatches
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    work = Path(args.workdir)
    shutil.rmtree(work / "meg", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    times: dict[str, float] = {}
    hf = Path(args.hf) if args.hf else work / "hf"
    if not args.hf and not hf.exists():
        from make_checkpoint import make_checkpoint

        start = time.perf_counter()
        print(json.dumps(make_checkpoint(hf, args.size, args.dtype)))
        times["make_checkpoint_s"] = time.perf_counter() - start
    ep = ParallelConfig(ep=args.ep)
    start = time.perf_counter()
    meta = run_parallel(import_hf, args.ep, str(hf), str(work / "meg"), ep, None, False)
    times[f"import_ep{args.ep}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    report = run_parallel(verify, args.ep, str(hf), str(work / "meg"), ep, [], None, DEFAULT_PROMPT,
                          None, None, meta["dtype"] != "fp32")
    times[f"verify_ep{args.ep}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    run_parallel(export_hf, 1, str(work / "meg"), str(work / "out"), ParallelConfig(), None, False)
    times["export_ep1_s"] = time.perf_counter() - start
    bad = checkpoint_mismatches(hf, work / "out")
    result = {"meta": meta, "times": times, "round_trip_bit_exact": not bad,
              "mismatches": bad[:5], "verify": report}
    print(json.dumps(result))
    return 0 if not bad and report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
