"""Run with TRITON_INTERPRET=1 (by test_fused_elementwise.py): each hand-written Triton kernel of
``fused_triton`` against the eager body of ``fused``, values and gradients. In fp32 they agree to
rounding. In bf16 they agree within a few bf16 steps only: the interpreter truncates fp32 to bf16
where a GPU rounds to nearest, so the bf16 error comparison against fp32 runs on the GPU
(``tests/gpu/test_fused_gpu.py``). Prints one "ok" line per case and exits non-zero on the first
mismatch."""

from __future__ import annotations

import os

import torch

from vlm_bridge.families._common import fused, fused_triton


def values_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out.backward(upstream.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def max_error(values: list, reference: list) -> list[float]:
    return [float((v.float() - r.float()).abs().max()) for v, r in zip(values, reference, strict=True)]


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1" and fused_triton.available(torch.zeros(1))
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(4)
        x, residual = (t.to(dtype) for t in torch.randn(2, 5, 3, 40, generator=gen))  # width not 2^k
        w = (torch.randn(40, generator=gen) * 0.1).to(dtype)
        heads = torch.randn(6, 2, 16, generator=gen).to(dtype)[:, :, :8]  # rows not contiguous
        glu_in = torch.randn(5, 3, 2 * 24, generator=gen).to(dtype)
        cases = {
            "norm+residual": (lambda a, b, c: fused_triton.rms_norm(a, b, 1.0, 1e-6, c),
                              lambda a, b, c: fused._rms_norm_add(a, b, c, 1.0, 1e-6), (x, w, residual)),
            "head norm": (lambda a, b: fused_triton.rms_norm(a, b, 0.0, 1e-5),
                          lambda a, b: fused._rms_norm(a, b, 0.0, 1e-5), (heads, w[:8])),
            "gelu-tanh gate": (fused_triton.gelu_tanh_glu, fused._gelu_tanh_glu, (glu_in,)),
        }
        for name, (triton_fn, eager_fn, tensors) in cases.items():
            got, want = values_and_grads(triton_fn, *tensors), values_and_grads(eager_fn, *tensors)
            for g, e in zip(got, want, strict=True):
                assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, e.dtype)
            # bf16: four steps of 2^-8 relative (truncation and rounding differ by up to one per op).
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-6, "atol": 2**-6}
            for g, e in zip(got, want, strict=True):
                torch.testing.assert_close(g, e, **tol, msg=lambda m, n=name: f"{n}: {m}")
            print(f"ok {name} {dtype} max diff {max(max_error(got, want)):.2e}")
    check_adam_kernel()


def check_adam_kernel() -> None:
    """The fused AdamW update (bf16 moments) from a bf16 gradient it widens and clips itself,
    against the sliced torch update, which widens and clips the same way."""
    from vlm_bridge.train import adam_triton
    from vlm_bridge.train.low_memory_adam import AdamWBf16Moments

    kernel, cdiv = adam_triton._kernel()
    gen = torch.Generator().manual_seed(5)
    n = adam_triton.BLOCK + 7  # a partial last block
    start = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(3)]
    # a different clipping coefficient each step: Adam is blind to one constant scale of all steps
    scales = (0.25, 1.0, 0.05)
    results = []
    for fused_path, step_scales in ((True, scales), (False, scales), (False, (1.0, 1.0, 1.0))):
        param = start.clone()
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        for step, (grad, scale) in enumerate(zip(grads, step_scales, strict=True), start=1):
            c1, rc2, lr, wd, eps, b1, b2 = 1 - 0.9**step, (1 - 0.95**step) ** 0.5, 1e-3, 0.1, 1e-8, 0.9, 0.95
            if fused_path:
                kernel[(cdiv(n, adam_triton.BLOCK),)](param, grad, scale, m, v, n, 1 - lr * wd, b1, 1 - b1,
                                                      b2, 1 - b2, eps, lr / c1, 1 / rc2,
                                                      BLOCK=adam_triton.BLOCK)
            else:
                AdamWBf16Moments._update(param, grad, scale, {"exp_avg": m, "exp_avg_sq": v}, lr, wd, eps, b1,
                                         b2, c1, rc2)
        results.append((param, v))
    (p_fused, v_fused), (p_torch, v_torch), (p_unclipped, _) = results
    # the interpreter truncates the moments to bf16 where torch rounds: a moment may sit one bf16
    # step (2^-8 relative) lower, and each of the 3 updates (lr 1e-3) may differ by that fraction
    diff = (p_fused - p_torch).abs().max()
    assert diff < 3e-5, diff
    assert (p_unclipped - p_torch).abs().max() > 10 * 3e-5  # the coefficients matter here
    # and a moment may be up to one bf16 step (2^-7 relative) lower per step
    torch.testing.assert_close(v_fused.float(), v_torch.float(), rtol=3 * 2**-7, atol=0)
    print(f"ok adam bf16 grad clipped max diff {diff:.2e}")

if __name__ == "__main__":
    main()
