"""HF vs Megatron parity at real Qwen2.5-VL-7B dimensions (random weights), meant for one H200.

    python benchmarks/gpu_parity.py --size 7b --dtype bf16 --workdir /scratch/vlmb [--import-export]
    python benchmarks/gpu_parity.py --size tiny --workdir /tmp/vlmb      # the same path, CPU-sized

Writes the checkpoint with make_checkpoint.py into ``WORKDIR/hf`` (reused when present: 16.6 GB
of random bf16 takes minutes to write), runs ``vlm_bridge.verify.verify`` (in-memory import, then
the HF model; both fit the 139 GiB GPU at 7B: ~16.6 GB each) on one rank with generated media,
and prints the report and wall times. ``--import-export`` also times the on-disk import and export
through convert_throughput.py (with its raw-read baseline and bit-exact round-trip check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Run as a script: make the sibling benchmark modules importable whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _gpu_peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["7b", "qwen3_8b", "tiny"], default="7b")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="checkpoint and compute dtype")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default=None)
    p.add_argument("--fresh", action="store_true", help="rewrite WORKDIR/hf even if it exists")
    p.add_argument("--import-export", action="store_true", help="also time on-disk import/export")
    p.add_argument("--tp", type=int, default=1, help="TP for --import-export only (verify uses 1)")
    p.add_argument("--keep", action="store_true", help="keep WORKDIR/convert (2 more model copies)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("CI", "1")  # no tqdm bars between the timings

    import torch
    from make_checkpoint import make_checkpoint

    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    if not torch.cuda.is_available():
        print("note: no CUDA device; running on CPU (fine for --size tiny)", file=sys.stderr)
    workdir = Path(args.workdir)
    hf_dir = workdir / "hf"
    times: dict[str, float] = {}
    start = time.perf_counter()
    # config.json is written last inside an atomically renamed folder, so its presence means a
    # complete checkpoint; a different --size or --dtype needs --fresh (checked below).
    if args.fresh or not (hf_dir / "config.json").is_file():
        make_checkpoint(hf_dir, args.size, args.dtype, overwrite=True)
        times["make_checkpoint_s"] = time.perf_counter() - start
    _check_reused(hf_dir, args.size, args.dtype)

    start = time.perf_counter()
    report = run_parallel(verify, 1, str(hf_dir), None, ParallelConfig(), [], None,
                          args.prompt or DEFAULT_PROMPT, args.dtype, None, args.dtype != "fp32")
    times["verify_s"] = time.perf_counter() - start
    result: dict = {"size": args.size, "dtype": args.dtype, "device": _device_name(),
                    "times": times, "verify_gpu_peak_gb": _gpu_peak_gb(), "report": report}

    if args.import_export:
        from convert_throughput import benchmark

        try:
            result["convert"] = benchmark(str(hf_dir), str(workdir / "convert"), args.tp, None)
        finally:  # at 7B the Megatron and exported copies are 33 GB of a 64 GiB disk
            if not args.keep:
                shutil.rmtree(workdir / "convert", ignore_errors=True)
    print(json.dumps(result))
    _print_summary(result)
    ok = report["passed"] and result.get("convert", {}).get("round_trip", {}).get("equal", True)
    return 0 if ok else 1


def _check_reused(hf_dir: Path, size: str, dtype: str) -> None:
    """Refuse to report a 7B number from a tiny (or other-dtype) checkpoint left in the workdir."""
    from make_checkpoint import DTYPES, build_config

    cfg = json.loads((hf_dir / "config.json").read_text())
    got = (cfg["text_config"]["hidden_size"], cfg.get("dtype"))
    want = (build_config(size, False).text_config.hidden_size, str(DTYPES[dtype]).removeprefix("torch."))
    if got != want:
        raise SystemExit(f"{hf_dir} holds hidden size {got[0]} in {got[1]}, not {want[0]} in "
                         f"{want[1]}; pass --fresh to rewrite it")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _print_summary(r: dict) -> None:
    from vlm_bridge.cli import format_report

    print(f"\n{r['size']} {r['dtype']} on {r['device']}")
    for name, secs in r["times"].items():
        print(f"  {name:<20}{secs:>9.1f} s")
    if r["verify_gpu_peak_gb"] is not None:
        print(f"  {'verify GPU peak':<20}{r['verify_gpu_peak_gb']:>9.1f} GB")
    print(format_report(r["report"]))
    if "convert" in r:
        from convert_throughput import table

        print(table(r["convert"]))


if __name__ == "__main__":
    raise SystemExit(main())
