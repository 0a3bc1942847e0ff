"""Time a training checkpoint save (model, optimizer, scheduler, RNG: Megatron ``torch_dist``) with
and without a CRC32 per record, alternately in one process, on the same run state.

    python benchmarks/checkpoint_save.py [--hidden 2048] [--ffn 8192] [--layers 4] [--repeats 2]

A Qwen2.5-VL of the tiny builder's vision tower and tokenizer with a widened language model (random
weights, fp32, fp32 Adam moments) takes one training step, which creates the optimizer state; the
same state is then saved ``--repeats`` times each way, alternating, each save into its own folder
(removed after, so the page cache does not fill with earlier saves). The baseline is torch.save's
default, a CRC32 of every record; the library's saves skip it (``convert.streaming.without_record_crc``).
Prints one JSON line, then a table: seconds and GB/s of checkpoint bytes per save.

``--first-save`` times instead the first save of a fresh process, twice each way alternating:
the library's (write results through a queue in the rank) against Megatron's own, which starts a
spawned ``Manager`` process for them at a process's first save.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_step_memory import build  # noqa: E402  (same widened model)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed_saves(cfg, repeats: int) -> dict:
    from vlm_bridge.train import checkpoint, trainer

    run = trainer.setup(cfg)
    trainer.train_step(run)
    without_crc = checkpoint.without_record_crc
    times: dict[str, list[float]] = {"crc": [], "no_crc": []}
    size = 0
    for _ in range(repeats):
        for mode in ("crc", "no_crc"):
            checkpoint.without_record_crc = without_crc if mode == "no_crc" else contextlib.nullcontext
            start = time.perf_counter()
            path = trainer.save(run)
            times[mode].append(time.perf_counter() - start)
            size = _folder_bytes(path)
            shutil.rmtree(Path(path).parent)
    checkpoint.without_record_crc = without_crc
    return {"checkpoint_gb": size / 1e9, **{f"{m}_s": t for m, t in times.items()}}


def _first_save(cfg, with_manager: bool) -> dict:
    from vlm_bridge.train import checkpoint, trainer

    if with_manager:
        checkpoint._write_results_in_process = contextlib.nullcontext
    run = trainer.setup(cfg)
    trainer.train_step(run)
    start = time.perf_counter()
    path = trainer.save(run)
    seconds = time.perf_counter() - start
    shutil.rmtree(Path(path).parent)
    run.stream.close()
    return {"seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--first-save", action="store_true",
                   help="time a fresh process's first save, with and without Megatron's Manager")
    p.add_argument("--first-save-child", choices=("manager", "in_rank"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CI", "1")
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckptsave_"))
    model, data = build(args, workdir)
    cfg = apply_overrides(get_recipe("demo_tiny"), [
        "steps=2", "global_batch_size=2", "micro_batch_size=1", "tensorboard=false",
        "checkpoint.save_every=0"])
    cfg.pretrained, cfg.output_dir = str(model), str(workdir / "run")
    cfg.data.train = f"jsonl:{data}"
    if args.first_save_child:  # a fresh process: its first save, one way
        print(json.dumps(run_parallel(_first_save, 1, cfg, args.first_save_child == "manager")))
        return
    if args.first_save:
        times: dict[str, list[float]] = {"manager": [], "in_rank": []}
        for _ in range(args.repeats):
            for mode in times:
                child = subprocess.run(
                    [sys.executable, __file__, "--workdir", str(workdir), "--hidden", str(args.hidden),
                     "--ffn", str(args.ffn), "--layers", str(args.layers), "--first-save-child", mode],
                    check=True, capture_output=True, text=True)
                times[mode].append(json.loads(child.stdout.strip().splitlines()[-1])["seconds"])
        report = {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "first_save_s": times,
                  "speedup_best": min(times["manager"]) / min(times["in_rank"])}
        print(json.dumps(report))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        for mode, label in (("manager", "Megatron's Manager"), ("in_rank", "queue in the rank")):
            print(f"{label:<20} first save: {', '.join(f'{t:.2f}' for t in times[mode])} s")
        return
    result = run_parallel(_timed_saves, 1, cfg, args.repeats)
    best = {m: min(result[f"{m}_s"]) for m in ("crc", "no_crc")}
    report = {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, **result,
              "speedup": best["crc"] / best["no_crc"]}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    gb = result["checkpoint_gb"]
    print(f"\ncheckpoint {gb:.2f} GB (model, fp32 Adam moments, scheduler, RNG)")
    print(f"{'records':<12}{'best s':>9}{'GB/s':>8}   all saves")
    for mode, label in (("crc", "CRC32"), ("no_crc", "no CRC32")):
        runs = ", ".join(f"{t:.2f}" for t in result[f"{mode}_s"])
        print(f"{label:<12}{best[mode]:>9.2f}{gb / best[mode]:>8.2f}   {runs}")
    print(f"without CRC32: {report['speedup']:.2f}x faster saves")


if __name__ == "__main__":
    main()
