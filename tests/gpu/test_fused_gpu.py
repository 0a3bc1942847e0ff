"""The Triton kernels ``torch.compile`` generates for the fused norm and gated activation equal
their eager bodies on a GPU: values and gradients, fp32 and bf16, at two token counts."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.families._common import fused

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(upstream)
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _compare(fused_fn, eager_fn, tensors, dtype):
    upstream = torch.randn_like(eager_fn(*tensors))
    got, want = _run(fused_fn, tensors, upstream), _run(eager_fn, tensors, upstream)
    # bf16: the fused kernel rounds once where eager rounds per op; allow a few bf16 ulps.
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max())
        assert float((g - w).abs().max()) <= tol * max(scale, 1.0), (float((g - w).abs().max()), scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4096, 1531])
def test_compiled_kernels_match_eager(dtype, rows):
    assert fused.fusion_enabled(torch.zeros(1, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, residual = torch.randn(2, rows, 1, 640, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(640, device="cuda", generator=gen) * 0.1).to(dtype)
    _compare(lambda a, b, c: fused.fp32_rms_norm(a, b, 1.0, 1e-6, c),
             lambda a, b, c: fused._rms_norm_add(a, b, c, 1.0, 1e-6), (x, w, residual), dtype)
    heads = torch.randn(rows, 1, 8, 256, device="cuda", generator=gen).to(dtype)
    _compare(lambda a, b: fused.fp32_rms_norm(a, b, 1.0, 1e-6), lambda a, b: fused._rms_norm(a, b, 1.0, 1e-6),
             (heads, torch.randn(256, device="cuda", generator=gen).to(dtype)), dtype)
    glu = torch.randn(rows, 1, 2 * 1280, device="cuda", generator=gen).to(dtype)
    _compare(fused.gelu_tanh_glu, fused._gelu_tanh_glu, (glu,), dtype)
