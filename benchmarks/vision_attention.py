"""A vision tower's attention, forward + backward, at one step's size: SDPA as the model calls it
(the baseline: torch picks the kernel), each fused backend forced, and the head dim zero-padded
to the next size the flash kernels are built for. SigLIP's heads are 72 wide (16 x 72 = 1152).

    python3 benchmarks/vision_attention.py --images 23 --tokens 4096 --head-dim 72 --out $OUT/va.json

Zero columns added to queries and keys leave every score unchanged (the softmax scale stays the
unpadded one) and zero columns of the values come out as zero columns, which are sliced off.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from cross_entropy import _report, _time_ms
from torch.nn.attention import SDPBackend, sdpa_kernel


def _padded(q, k, v, width: int, scale: float):
    pad = width - q.shape[-1]
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., : width - pad]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=23)
    p.add_argument("--tokens", type=int, default=4096, help="patches per image")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("vision_attention.py times CUDA kernels: it needs a GPU")

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.images, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen).bfloat16() for _ in range(3))
    upstream = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    scale = args.head_dim ** -0.5
    flops = 4 * args.images * args.heads * args.tokens ** 2 * args.head_dim * 3.5  # fwd + bwd

    def variant(backend, width):
        def step() -> None:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                if width == args.head_dim:
                    out = F.scaled_dot_product_attention(*leaves, scale=scale)
                else:
                    out = _padded(*leaves, width, scale)
            out.backward(upstream)
        return step

    reference = None
    result = {"shape": list(shape), "device": torch.cuda.get_device_name()}
    widths = sorted({args.head_dim, -(-args.head_dim // 32) * 32, -(-args.head_dim // 64) * 64, 128})
    for name, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for width in widths:
            key = f"{name}_d{width}"
            try:
                ms, gb = _time_ms(variant(backend, width), args.repeats)
            except RuntimeError as err:
                result[key] = {"error": str(err).splitlines()[0][:200]}
                continue
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                out = (F.scaled_dot_product_attention(*leaves, scale=scale) if width == args.head_dim
                       else _padded(*leaves, width, scale))
            if reference is None:
                reference = out.detach().float()
            diff = (out.detach().float() - reference).abs().max().item()
            result[key] = {"ms": ms, "added_gb": gb, "tflops": flops / ms / 1e9, "max_diff_vs_default": diff}
            del out, leaves
    base = result[f"default_d{args.head_dim}"]["ms"]
    timed = {k: r["ms"] for k, r in result.items() if isinstance(r, dict) and "ms" in r}
    for k in timed:
        result[k]["speedup_vs_default"] = base / timed[k]
    best = min(timed, key=timed.get)
    _report(result, f"default {base:.1f} ms; best {best} {timed[best]:.1f} ms ({base / timed[best]:.2f}x)",
            args.out)


if __name__ == "__main__":
    main()
