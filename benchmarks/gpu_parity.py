"""HF vs Megatron parity at real Qwen-VL / Gemma 3 / Nemotron VL dimensions (random weights), for one H200.

    python benchmarks/gpu_parity.py --size 7b --dtype bf16 --workdir /scratch/vlmb [--import-export]
    python benchmarks/gpu_parity.py --size tiny --workdir /tmp/vlmb      # the same path, CPU-sized
    python benchmarks/gpu_parity.py --size gemma3_4b --dtype bf16 --workdir /scratch/g4b
    python benchmarks/gpu_parity.py --size gemma3_27b --tp 2 --workdir /scratch/g27b   # 2 GPUs
    python benchmarks/gpu_parity.py --size nemotron_12b --workdir /scratch/n12

Writes the checkpoint with make_checkpoint.py into ``WORKDIR/hf`` (reused when present: 16.6 GB
of random bf16 takes minutes to write), runs ``vlm_bridge.verify.verify`` (in-memory import, then
the HF model; both fit the 139 GiB GPU at 7B: ~16.6 GB each) on one rank with generated media,
and prints the report and wall times. ``--import-export`` also times the on-disk import and export
through convert_throughput.py (with its raw-read baseline and bit-exact round-trip check).

``--tp N`` runs verify on N ranks (N GPUs) with the Megatron model tensor-parallel; the HF reference
still runs whole on rank 0's GPU, beside rank 0's Megatron shard. In half precision verify also runs
HF in fp32 as the reference (``--no-fp32-baseline`` skips it). GPU 0 then holds, at 27B: TP=1 bf16
51 GiB Megatron + 51 GiB HF, fits; the fp32 reference adds 102 GiB, so it needs TP=2 (26 GiB shard +
102 GiB = 128 GiB of ~139 GiB: tight; on an OOM rerun with --no-fp32-baseline, which judges bf16 HF
vs bf16 Megatron directly and, with random weights, may FAIL on near-tied argmaxes: read the KL).
Gemma 3 has no video: verify runs an image row (two images) and a text-only row. ``--import-export``
writes two more model copies (Megatron + export): 3 x 55 GB at 27B, more than a 128 GiB disk; there
time the on-disk import alone (``vlm-bridge import --tp 2``, then ``verify --megatron-path``).
Nemotron VL (``nemotron_12b``, 26.3 GB in bf16; ``nemotron_tiny`` on CPU): verify runs the images +
text batch and then the video alone (its HF model cannot take both in one forward); GPU 0 holds
Megatron bf16 (26 GB) and at most one HF copy at a time (26 GB bf16, then 53 GB fp32). HF runs
transformers' pure-torch Mamba scan (no ``mamba_ssm``), Megatron the family's own.
"""

from __future__ import annotations

import argparse
import json
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b",
                   choices=["7b", "qwen3_8b", "tiny", "gemma3_4b", "gemma3_12b", "gemma3_27b", "gemma3_tiny",
                            "nemotron_12b", "nemotron_tiny"])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="checkpoint and compute dtype")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default=None)
    p.add_argument("--fresh", action="store_true", help="rewrite WORKDIR/hf even if it exists")
    p.add_argument("--import-export", action="store_true", help="also time on-disk import/export")
    p.add_argument("--tp", type=int, default=1, help="TP (ranks, one per GPU) for verify and --import-export")
    p.add_argument("--no-fp32-baseline", action="store_true",
                   help="half precision: skip the HF fp32 reference run (27B: see above)")
    p.add_argument("--keep", action="store_true", help="keep WORKDIR/convert (2 more model copies)")
    args = p.parse_args(argv)
    from make_checkpoint import make_checkpoint, offline_and_quiet

    offline_and_quiet()
    import torch

    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    if not torch.cuda.is_available():
        print("note: no CUDA device; running on CPU (fine for the *tiny sizes)", file=sys.stderr)
    elif args.tp > torch.cuda.device_count():
        raise SystemExit(f"--tp {args.tp}: only {torch.cuda.device_count()} CUDA devices")
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
    report = run_parallel(verify, args.tp, str(hf_dir), None, ParallelConfig(tp=args.tp), [], None,
                          args.prompt or DEFAULT_PROMPT, args.dtype, None,
                          args.dtype != "fp32" and not args.no_fp32_baseline)
    times["verify_s"] = time.perf_counter() - start
    # With --tp > 1 the ranks are spawned processes: this one never touched the GPU, its peak says nothing.
    peak = _gpu_peak_gb() if args.tp == 1 else None
    result: dict = {"size": args.size, "dtype": args.dtype, "tp": args.tp, "device": _device_name(),
                    "times": times, "verify_gpu_peak_gb": peak, "report": report}

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
    """Refuse to report a 7B number from a tiny (or other-dtype, other-family) checkpoint left in the
    workdir; the model type matters too: tiny Qwen and tiny Gemma share hidden size 64."""
    from make_checkpoint import DTYPES, build_config

    cfg = json.loads((hf_dir / "config.json").read_text())
    config = build_config(size, False)
    got = (cfg.get("model_type"), cfg["text_config"]["hidden_size"], cfg.get("dtype"))
    want = (config.model_type, config.text_config.hidden_size, str(DTYPES[dtype]).removeprefix("torch."))
    if got != want:
        raise SystemExit(f"{hf_dir} holds {got[0]} hidden size {got[1]} in {got[2]}, not {want[0]} "
                         f"{want[1]} in {want[2]}; pass --fresh to rewrite it")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _print_summary(r: dict) -> None:
    from vlm_bridge.verify import format_report

    print(f"\n{r['size']} {r['dtype']} TP={r['tp']} on {r['device']}")
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
