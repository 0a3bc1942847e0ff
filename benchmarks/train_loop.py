"""A fine-tuning run's own steps with its data pipeline: the trainer's stream reads a JSONL file of
image+text samples from disk, encodes, packs and collates them, then trains. ``sft_step.py``
encodes once before timing, so this is where the host's share of a real step shows.

    python3 benchmarks/train_loop.py --size 7b --num-layers 14 --workdir /tmp/w --mode sft \\
        --out $OUT/loop.json

``--configs`` lists ``workers:ahead`` pairs (default: 0:off, W:off and W:on with W as
``data.workers=-1`` picks it for one GPU): ``data.workers`` (encoding processes) and whether the
next step is built in a thread while one trains (``VLM_BRIDGE_PREPARE_AHEAD``). The first pair is
the baseline (``0:off``: everything in the rank between steps, the trainer before either). Each
pair trains in a fresh process from the same checkpoint and data; reported per pair: every step's
wall time, the median after ``--warmup`` steps, tokens/s and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_dataset(folder: Path, count: int, seed: int, tokenizer) -> Path:
    """``count`` of the step benchmark's samples as a JSONL file with PNG images beside it."""
    from sft_step import make_samples

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(make_samples(count, seed, tokenizer)):
        for turn in sample["messages"]:
            for item in turn["content"] if isinstance(turn["content"], list) else []:
                if item.get("type") == "image":
                    name = f"image_{i:05d}.png"
                    item["image"].save(folder / name)
                    item["image"] = name
        rows.append(json.dumps(sample))
    path = folder / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _rank(hf_dir: str, data: str, args, workers: int, ahead: bool) -> dict:
    import torch

    from vlm_bridge.train import trainer
    from vlm_bridge.train.config import PeftSettings, TrainConfig

    os.environ["VLM_BRIDGE_PREPARE_AHEAD"] = "1" if ahead else "0"
    cfg = TrainConfig(dtype=args.dtype, steps=args.warmup + args.steps, micro_batch_size=args.micro_batch,
                      global_batch_size=args.rows, recompute_elementwise=args.recompute_elementwise)
    cfg.pretrained, cfg.output_dir = hf_dir, tempfile.mkdtemp(prefix="train_loop_")
    cfg.data.train, cfg.data.workers, cfg.data.seq_len = f"jsonl:{data}", workers, args.seq_len
    cfg.optim.warmup_steps = 0
    cfg.optim.moments = "bf16" if args.bf16_moments else "fp32"
    cfg.optim.grad_reduce_in_fp32 = not args.bf16_grads
    cfg.tensorboard = False
    if args.mode == "lora":
        cfg.peft = PeftSettings(method="lora", rank=16, alpha=32.0)
    run = trainer.setup(cfg)
    run.model.train()
    times, tokens = [], []
    try:
        for step in range(cfg.steps):
            start = time.perf_counter()
            stats = trainer.train_step(run, prepare_next=step + 1 < cfg.steps)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            tokens.append(stats["tokens"])
    finally:
        run.stream.close()
    timed = slice(args.warmup, None)
    step_s = sorted(times[timed])[len(times[timed]) // 2]
    return {"workers": workers, "ahead": ahead, "step_times": times, "tokens": tokens, "step_s": step_s,
            "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
            "losses": run.losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", help="make_checkpoint size (as sft_step.py)")
    p.add_argument("--hf", default=None, help="use this HF folder instead of WORKDIR/hf")
    p.add_argument("--workdir", default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--mode", choices=("sft", "lora"), default="sft")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))  # what data.workers=-1 picks for one GPU
    p.add_argument("--configs", default=f"0:off,{workers}:off,{workers}:on")
    p.add_argument("--rows", type=int, default=5, help="packed rows a step (global_batch_size)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--samples", type=int, default=400, help="distinct samples on disk (epochs repeat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16-moments", action="store_true")
    p.add_argument("--bf16-grads", action="store_true")
    p.add_argument("--recompute-elementwise", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from sft_step import trimmed_checkpoint
    from transformers import AutoTokenizer

    from vlm_bridge.parallel import run_parallel

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_loop_"))
    hf_dir = Path(args.hf) if args.hf else workdir / "hf"
    if not args.hf and not (hf_dir / "config.json").is_file():
        from make_checkpoint import make_checkpoint

        make_checkpoint(hf_dir, args.size, "bf16", overwrite=True)
    if args.num_layers is not None:
        hf_dir = trimmed_checkpoint(hf_dir, args.num_layers)
    data = workdir / "data" / "train.jsonl"
    if not data.is_file():
        write_dataset(data.parent, args.samples, args.seed, AutoTokenizer.from_pretrained(hf_dir))
    pairs = [(int(w), a == "on") for w, a in (c.split(":") for c in args.configs.split(","))]
    results = []
    report = {"hf_dir": str(hf_dir), "mode": args.mode, "rows": args.rows, "cpus": os.cpu_count(),
              "results": results}
    for workers, ahead in pairs:
        print(f"== data.workers={workers}, built ahead: {ahead}", file=sys.stderr, flush=True)
        results.append(run_parallel(_rank, 1, str(hf_dir), str(data), args, workers, ahead))
        results[-1]["over_first"] = results[-1]["tokens_per_s"] / results[0]["tokens_per_s"]
        if args.out:  # what is measured so far survives a run cut short
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    print(f"\n{'workers':<9}{'ahead':<7}{'step s (median)':>16}{'tok/s':>10}{'vs first':>10}   every step")
    for r in results:
        every = ", ".join(f"{t:.2f}" for t in r["step_times"])
        print(f"{r['workers']:<9}{'yes' if r['ahead'] else 'no':<7}{r['step_s']:>16.3f}"
              f"{r['tokens_per_s']:>10,.0f}{r['over_first']:>9.2f}x   {every}")


if __name__ == "__main__":
    main()
