"""Long-video training steps at CP=1 and CP=2: step time, tokens/s, peak memory per GPU, longest fit.

    python benchmarks/context_parallel.py --size 7b --workdir /tmp/cp --lengths 16384,32768,65536 \\
        --cps 1,2 --out results.json          # 2 GPUs (nvidia-h200-x2)
    python benchmarks/context_parallel.py --size tiny --workdir /tmp/t --dtype fp32 --lengths 1024 --cps 1,2

One sample per step: a single video whose frames (``--frame-px`` squared, default 448) give the
requested number of tokens (Qwen2.5-VL: 256 tokens per 2 frames at 448 px), plus a one-line
question and answer; bf16 LoRA on the language model (rank 16), full recomputation, the trainer's
own ``train_step`` (Megatron DDP, Adam). CP=1 runs on one GPU, CP=2 on two (each rank holds half
of the sequence, encodes half of the video's frame groups and exchanges keys and values). After
``--warmup`` steps, ``--steps`` steps are timed. An out-of-memory step is recorded as such (CP=1
runs first, and each result is written as soon as it exists, so a CP=2 failure loses nothing).
Scaling efficiency at a length = CP=1 step time / CP=2 step time / 2 (1.0 = perfect).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENS_PER_GROUP = {448: 256, 224: 64}  # Qwen2.5-VL tokens per 2 frames at these sides


def write_sample(folder: Path, tokens: int, px: int) -> Path:
    """Frames of a video of about ``tokens`` vision tokens, and a JSONL with one conversation."""
    from vlm_bridge.testing.media import make_image

    groups = max(1, tokens // TOKENS_PER_GROUP[px])
    frames = folder / f"frames_{tokens}"
    if not frames.is_dir():
        frames.mkdir(parents=True)
        base = make_image(px, px, seed=tokens)
        for i in range(2 * groups):  # a moving crop keeps frames different
            base.rotate(i % 360).save(frames / f"{i:05d}.jpg", quality=90)
    data = folder / f"video_{tokens}.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "video", "video": str(frames)},
                                     {"type": "text", "text": "Describe the clip."}]},
        {"role": "assistant", "content": "A picture turns slowly."}]}) + "\n")
    return data


def run_steps(cfg, warmup: int, steps: int) -> dict:
    """Run on every rank of a CP group: timed training steps (rank 0 reports)."""
    import torch
    import torch.distributed as dist

    from vlm_bridge.train.trainer import setup, train_step

    try:
        run = setup(cfg)
        run.model.train()
        for _ in range(warmup):
            train_step(run)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = [train_step(run) for _ in range(steps)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError as exc:
        return {"oom": str(exc).splitlines()[0][:200]}
    finally:
        if "run" in locals():
            run.stream.close()  # its encoding workers
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        from vlm_bridge.parallel import cpu_group

        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=cpu_group())
    tokens = stats[-1]["tokens"]
    return {"step_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_gb_per_gpu": float(peak), "loss": stats[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lengths", default="16384,32768,65536")
    p.add_argument("--cps", default="1,2")
    p.add_argument("--frame-px", type=int, default=448, choices=sorted(TOKENS_PER_GROUP))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from make_checkpoint import ensure_checkpoint, offline_and_quiet, print_and_save

    offline_and_quiet()
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.recipes.build import lora_recipe

    work = Path(args.workdir)
    hf_dir = work / "hf"
    report: dict = {"size": args.size, "dtype": args.dtype, "frame_px": args.frame_px, "runs": {},
                    **ensure_checkpoint(hf_dir, args.size, args.dtype, max_pixels=args.frame_px ** 2)}
    lengths = [int(x) for x in args.lengths.split(",")]
    for cp in (int(x) for x in args.cps.split(",")):
        for length in lengths:
            cfg = lora_recipe(f"cp{cp}_{length}")
            cfg.pretrained, cfg.output_dir = str(hf_dir), str(work / f"run_cp{cp}_{length}")
            cfg.dtype, cfg.recompute, cfg.tensorboard = args.dtype, True, False
            cfg.global_batch_size = cfg.micro_batch_size = 1
            cfg.steps = args.warmup + args.steps
            cfg.checkpoint.resume = False
            cfg.parallel.cp = cp
            cfg.data.train = f"jsonl:{write_sample(work, length, args.frame_px)}"
            cfg.data.seq_len = length + 512
            cfg.data.pack = False
            start = time.perf_counter()
            result = run_parallel(run_steps, cp, cfg, args.warmup, args.steps)
            result["wall_s"] = time.perf_counter() - start
            report["runs"][f"cp{cp}_{length}"] = result
            print(f"cp={cp} length={length}: {json.dumps(result)}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            if "oom" in result:
                break  # longer samples will not fit either
    for length in lengths:
        one, two = report["runs"].get(f"cp1_{length}", {}), report["runs"].get(f"cp2_{length}", {})
        if "step_s" in one and "step_s" in two:
            report[f"scaling_{length}"] = one["step_s"] / two["step_s"] / 2
    print_and_save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
