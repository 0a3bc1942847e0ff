"""The GELU-tanh gate of a Gemma MLP, forward + backward, at one micro-batch's size: the eager
torch ops (the baseline), the ``torch.compile`` chain and the hand-written Triton kernel
(``families/_common/fused_triton.py``), with the memory bandwidth each reaches.

    python3 benchmarks/gated_activation.py --tokens 16384 --width 20480 --out $OUT/glu.json
"""

from __future__ import annotations

import argparse
import os

import torch
from cross_entropy import _report, _time_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--width", type=int, default=20480, help="fc1 output width ([gate | up])")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gated_activation.py times CUDA kernels: it needs a GPU")

    from vlm_bridge.families._common import fused

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, 1, args.width, device="cuda", generator=gen).bfloat16()
    upstream = torch.randn(args.tokens, 1, args.width // 2, device="cuda", generator=gen).bfloat16()
    # Forward reads x and writes half of it; backward reads x and the upstream, writes x's size.
    moved_gb = x.numel() * 2 * (1 + 0.5 + 1 + 0.5 + 1) / 1e9

    def step() -> None:
        leaf = x.detach().requires_grad_()
        fused.gelu_tanh_glu(leaf).backward(upstream)

    result = {"tokens": args.tokens, "width": args.width, "device": torch.cuda.get_device_name(),
              "moved_gb": moved_gb}
    for backend in ("0", "compile", "triton"):
        os.environ["VLM_BRIDGE_FUSED"] = backend
        ms, _ = _time_ms(step, args.repeats)
        name = {"0": "eager"}.get(backend, backend)
        result[f"{name}_ms"], result[f"{name}_tb_s"] = ms, moved_gb / ms
    result["triton_over_eager"] = result["eager_ms"] / result["triton_ms"]
    result["triton_over_compile"] = result["compile_ms"] / result["triton_ms"]
    _report(result, f"triton {result['triton_ms']:.2f} ms ({result['triton_tb_s']:.2f} TB/s), compile "
                    f"{result['compile_ms']:.2f} ms, eager {result['eager_ms']:.2f} ms: "
                    f"{result['triton_over_compile']:.2f}x compile, {result['triton_over_eager']:.2f}x eager",
            args.out)


if __name__ == "__main__":
    main()
