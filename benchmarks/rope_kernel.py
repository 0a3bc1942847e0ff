"""The fused RoPE kernel's (token, row) pairs per program: time per call and memory bandwidth,
forward and backward, on the query/key shapes of a 7B VLM step, against one pair per program
(the kernel's earlier layout) in the same run. GPU only.

    python3 benchmarks/rope_kernel.py --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from vlm_bridge.families._common import fused_rope

# name: (tokens, heads of the fused qkv tensor, heads rotated, head dim, rotary dim)
SHAPES = {
    "vit_query_7.5k_patches": (7500, 48, 16, 80, 80),
    "lm_query_4k_tokens": (4096, 36, 28, 128, 128),
    "lm_key_4k_tokens": (4096, 36, 4, 128, 128),
}


def time_call(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,2,4,8,16",
                   help="pairs per program to try; the first is the baseline")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("rope_kernel.py needs a CUDA GPU")
    counts = [int(t) for t in args.tokens.split(",")]
    results = {"device": torch.cuda.get_device_name(), "default": fused_rope.TOKENS_PER_PROGRAM, "shapes": {}}
    for name, (tokens, qkv_heads, heads, dim, rot) in SHAPES.items():
        qkv = torch.randn(tokens, 1, qkv_heads, dim, device="cuda", dtype=torch.bfloat16)
        x = qkv[:, :, :heads]  # a view out of the fused projection, as attention hands it over
        freqs = torch.randn(tokens, 1, 1, rot, device="cuda")
        moved = 2 * x.numel() * x.element_size()  # read and written once
        row = {}
        for count in counts:
            fused_rope.TOKENS_PER_PROGRAM = count
            row[count] = {}
            for kind, backward in (("forward_ms", False), ("backward_ms", True)):
                call = functools.partial(fused_rope._launch, x, freqs, backward)
                row[count][kind] = round(time_call(call, args.repeats), 4)
            row[count]["gb_per_s"] = round(moved / row[count]["forward_ms"] / 1e6, 1)
        base = row[counts[0]]
        for count in counts:
            row[count]["speedup"] = round((base["forward_ms"] + base["backward_ms"])
                                          / (row[count]["forward_ms"] + row[count]["backward_ms"]), 3)
            print(f"{name:24s} pairs/program {count:3d}  fwd {row[count]['forward_ms']:.4f} ms  "
                  f"bwd {row[count]['backward_ms']:.4f} ms  {row[count]['gb_per_s']:7.1f} GB/s  "
                  f"x{row[count]['speedup']:.2f} vs {counts[0]}")
        results["shapes"][name] = row
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
