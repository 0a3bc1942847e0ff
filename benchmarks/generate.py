"""Generation speed: vlm-bridge's KV-cached decoding on Megatron-Core vs HF ``generate``, same inputs.

    python benchmarks/generate.py --size 7b --workdir /tmp/q7 --batches 1,32 --new-tokens 256 --out r.json
    python benchmarks/generate.py --size tiny --workdir /tmp/t --dtype fp32 --batches 1,4 --new-tokens 8

Each request is one image (a random side of 448-896 px, seeded) and a short prompt; a batch of 32
holds 32 different images, so prompts differ in length and are left-padded. Both systems decode
greedily for exactly ``--new-tokens`` tokens (EOS ignored: random weights), from the same
processor outputs, in bf16, one GPU. Reported per batch size: time to first token (prefill with
the vision tower, plus the first token), decode tokens/s over the remaining steps (batch x steps /
time), peak memory, and whether both produced the same tokens. HF runs ``generate`` with its
default dynamic cache and SDPA attention. Each system first runs one short warm-up generation.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Describe this image in detail."


def _requests(folder: Path, count: int, seed: int, low: int, high: int):
    from vlm_bridge.inference.requests import request_from_args
    from vlm_bridge.testing.media import make_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        w, h = rng.randint(low, high), rng.randint(low, high)
        path = folder / f"img_{seed}_{i}.png"
        if not path.exists():
            make_image(w, h, seed=seed * 1000 + i).save(path)
        out.append(request_from_args(PROMPT, [str(path)], None))
    return out


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def _ours(hf_dir: str, batches: dict, new_tokens: int, dtype) -> dict:
    import torch
    from transformers import AutoProcessor

    from vlm_bridge.inference.generate import Sampling, generate_tokens
    from vlm_bridge.inference.requests import build_prompt_batch
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), dtype)
    processor = AutoProcessor.from_pretrained(hf_dir, local_files_only=True)
    sampling = Sampling(max_new_tokens=new_tokens)
    warmup = build_prompt_batch(processor, batches[min(batches)][:1])
    generate_tokens(built, warmup, Sampling(max_new_tokens=4))
    results = {}
    for size, requests in batches.items():
        batch = build_prompt_batch(processor, requests)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        _sync()
        out = generate_tokens(built, batch, sampling)
        decode_steps = out.steps - 1
        results[size] = {
            "prompt_tokens": int(batch["input_ids"].shape[1]),
            "first_token_s": out.first_token_seconds,
            "decode_s": out.decode_seconds,
            "decode_tokens_per_s": size * decode_steps / out.decode_seconds,
            "peak_gb": _peak_gb(),
            "tokens": out.tokens,
        }
    del built
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def _hf(hf_dir: str, batches: dict, new_tokens: int, dtype) -> dict:
    import torch
    from transformers import AutoProcessor

    from vlm_bridge.inference.requests import build_prompt_batch
    from vlm_bridge.parallel import device
    from vlm_bridge.verify import load_hf_reference

    model = load_hf_reference(hf_dir, dtype).to(device()).eval()
    processor = AutoProcessor.from_pretrained(hf_dir, local_files_only=True)

    def run(batch, tokens):
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        _sync()
        return out, time.perf_counter() - start

    run(build_prompt_batch(processor, batches[min(batches)][:1]).to(device()), 4)
    results = {}
    for size, requests in batches.items():
        batch = build_prompt_batch(processor, requests).to(device())
        _, first = run(batch, 1)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        out, total = run(batch, new_tokens)
        prompt = batch["input_ids"].shape[1]
        results[size] = {
            "prompt_tokens": int(prompt),
            "first_token_s": first,
            "decode_s": total - first,
            "decode_tokens_per_s": size * (new_tokens - 1) / (total - first),
            "peak_gb": _peak_gb(),
            "tokens": out[:, prompt:].tolist(),
        }
    return results


def bench(hf_dir: str, workdir: str, sizes: list[int], new_tokens: int, dtype_name: str, seed: int,
          low: int, high: int, systems: list[str]) -> dict:
    """Run on one rank: both systems on the same requests."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    batches = {size: _requests(Path(workdir) / "images", size, seed + size, low, high) for size in sizes}
    report = {}
    if "megatron" in systems:
        report["megatron"] = _ours(hf_dir, batches, new_tokens, dtype)
    if "hf" in systems:
        report["hf"] = _hf(hf_dir, batches, new_tokens, dtype)
    if len(report) == 2:
        for size in sizes:
            ours, theirs = report["megatron"][size], report["hf"][size]
            same = sum(a == b[: len(a)] for a, b in zip(ours["tokens"], theirs["tokens"]))
            first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                          for a, b in zip(ours["tokens"], theirs["tokens"])]
            report[f"batch_{size}"] = {
                "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
                "first_token_speedup": theirs["first_token_s"] / ours["first_token_s"],
                "identical_rows": same, "rows": size,
                "median_first_differing_token": sorted(first_diff)[len(first_diff) // 2],
            }
    for system in ("megatron", "hf"):
        for size in report.get(system, {}):
            report[system][size].pop("tokens")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b")
    p.add_argument("--workdir", required=True, help="checkpoint in WORKDIR/hf (written if missing)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batches", default="1,32", help="comma list of batch sizes")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--min-px", type=int, default=448)
    p.add_argument("--max-px", type=int, default=896)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="megatron,hf")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from make_checkpoint import ensure_checkpoint, offline_and_quiet, print_and_save

    offline_and_quiet()
    from vlm_bridge.parallel import run_parallel

    hf_dir = Path(args.workdir) / "hf"
    # The processor keeps images up to --max-px squared (448-896 px sides: 256-1024 tokens).
    timings = ensure_checkpoint(hf_dir, args.size, args.dtype, max_pixels=args.max_px ** 2)
    sizes = [int(x) for x in args.batches.split(",")]
    report = run_parallel(bench, 1, str(hf_dir), args.workdir, sizes, args.new_tokens, args.dtype, args.seed,
                          args.min_px, args.max_px, args.systems.split(","))
    report.update(size=args.size, dtype=args.dtype, new_tokens=args.new_tokens, **timings)
    print_and_save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
