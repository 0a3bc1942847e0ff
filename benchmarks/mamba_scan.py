"""The Mamba-2 scan at Nemotron-Nano-12B-v2 dimensions, forward + backward on packed rows, same
inputs in the same run: the torch chunked scan with exact fp32 products and autograd keeping its
intermediates (the baseline), the training path (TF32 products, the backward recomputing the
forward) and the Triton (fla-core) path.

    python benchmarks/mamba_scan.py [--tokens 16384] [--samples 8] [--dtype bf16] [--out F.json]

Prints time per forward and per forward+backward of each path, its speed-up over the baseline,
peak memory and the max |diff| of the outputs and of the input gradients from the baseline's
(relative to the baseline's largest value).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _inputs(tokens: int, samples: int, dtype: torch.dtype, heads=128, head_dim=80, groups=8, state=128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, heads, head_dim, generator=gen).to("cuda", dtype)
    dt = torch.nn.functional.softplus(torch.randn(1, tokens, heads, generator=gen) - 3).cuda()
    A = -torch.rand(heads, generator=gen).mul(15).add(1).cuda()
    B, C = (torch.randn(1, tokens, groups, state, generator=gen).to("cuda", dtype) for _ in range(2))
    segments = (torch.arange(tokens) * samples // tokens)[None].cuda()
    return x, dt, A, B, C, segments


def _run(scan, args, steps: int, backward: bool) -> dict:
    leaves = [t.detach().clone().requires_grad_(backward and t.is_floating_point()) for t in args[:5]]
    out = None

    def once():
        nonlocal out
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(backward):
            out = scan(*leaves)
            if backward:
                out.float().square().mean().backward()

    for _ in range(2):  # warm-up (Triton compiles here)
        once()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    torch.cuda.synchronize()
    return {"ms": 1000 * (time.perf_counter() - start) / steps,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "out": out.detach().float(),
            "grad_x": leaves[0].grad.float() if backward else None}


def _exact_fp32(scan):
    from vlm_bridge.families._common.ssd_scan import SCAN_TF32_ENV

    def run(*args):
        os.environ[SCAN_TF32_ENV] = "0"
        try:
            return scan(*args)
        finally:
            os.environ.pop(SCAN_TF32_ENV)
    return run


def _compare(entry: dict, ref: dict, got: dict, backward: bool) -> None:
    entry["speedup"] = ref["ms"] / got["ms"]
    entry["max_rel_diff_out"] = float((got["out"] - ref["out"]).abs().max()) / float(ref["out"].abs().max())
    if backward:
        entry["max_rel_diff_grad_x"] = float((got["grad_x"] - ref["grad_x"]).abs().max()) / float(
            ref["grad_x"].abs().max())


def main(argv: list[str] | None = None) -> int:
    from vlm_bridge.families._common import ssd_triton
    from vlm_bridge.families._common.ssd_scan import recomputed_ssd_scan, segment_runs, ssd_scan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--samples", type=int, default=8, help="packed samples in the row")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("mamba_scan.py times CUDA kernels: it needs a GPU")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    x, dt, A, B, C, segments = _inputs(a.tokens, a.samples, dtype)
    runs = segment_runs(segments)
    paths = {
        "torch_fp32_autograd": _exact_fp32(lambda x, dt, A, B, C: ssd_scan(x, dt, A, B, C, 128, runs)[0]),
        "torch_training": lambda x, dt, A, B, C: recomputed_ssd_scan(x, dt, A, B, C, 128, runs),
        "triton": lambda x, dt, A, B, C: ssd_triton.triton_scan(x, dt, A, B, C, runs),
    }
    result = {"tokens": a.tokens, "samples": a.samples, "dtype": a.dtype,
              "dims": "heads 128 x head_dim 80, groups 8, d_state 128, chunk 128",
              "baseline": "torch_fp32_autograd"}
    for backward in (False, True):
        kind = "forward_backward" if backward else "forward"
        ref = _run(paths["torch_fp32_autograd"], (x, dt, A, B, C), a.steps, backward)
        entry = {"torch_fp32_autograd": {k: ref[k] for k in ("ms", "peak_gb")}}
        for name in ("torch_training", "triton"):
            if name == "triton" and not ssd_triton.available(x.device, needs_grad=backward):
                entry[name] = "not available here (fla-core missing, or no correct backward)"
                continue
            got = _run(paths[name], (x, dt, A, B, C), a.steps, backward)
            entry[name] = {k: got[k] for k in ("ms", "peak_gb")}
            _compare(entry[name], ref, got, backward)
            del got
        result[kind] = entry
        del ref
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
