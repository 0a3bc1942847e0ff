"""One fused GPU kernel for :class:`low_memory_adam.AdamWBf16Moments`: each element's gradient,
fp32 master weight and bf16 moments are read once, updated in fp32 registers and written back
(about 24 bytes of memory traffic per parameter, where the sliced torch update makes about a dozen
passes over fp32 temporaries). Triton ships with CUDA builds of torch; without it (CPU) the torch
update runs."""

from __future__ import annotations

import functools

import torch

BLOCK = 4096


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def adamw_bf16_moments(param, grad, grad_scale, exp_avg, exp_avg_sq, n, decay, beta1, one_minus_beta1,
                           beta2, one_minus_beta2, eps, step_size, inv_root_correction2, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        # a bf16 gradient is widened here, then clipped (grad_scale is 1 when it is not)
        g = tl.load(grad + offsets, mask=inside).to(tl.float32) * grad_scale
        m = tl.load(exp_avg + offsets, mask=inside).to(tl.float32) * beta1 + one_minus_beta1 * g
        v = tl.load(exp_avg_sq + offsets, mask=inside).to(tl.float32) * beta2 + one_minus_beta2 * g * g
        tl.store(exp_avg + offsets, m.to(tl.bfloat16), mask=inside)
        tl.store(exp_avg_sq + offsets, v.to(tl.bfloat16), mask=inside)
        p = tl.load(param + offsets, mask=inside) * decay
        p = p - step_size * (m / (tl.sqrt(v) * inv_root_correction2 + eps))
        tl.store(param + offsets, p, mask=inside)

    return adamw_bf16_moments, triton.cdiv


def fused_update(param: torch.Tensor, grad: torch.Tensor, grad_scale: float, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, lr: float, weight_decay: float, eps: float, beta1: float,
                 beta2: float, correction1: float, root_correction2: float) -> bool:
    """Run the update in one kernel; False (nothing done) where it does not apply."""
    found = _kernel() if param.is_cuda else None
    if found is None or param.dtype != torch.float32 or exp_avg.dtype != torch.bfloat16 \
            or not all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq)):
        return False
    kernel, cdiv = found
    n = param.numel()
    # 1 - beta in double, rounded once, as torch's update does (fp32 1 - 0.9 is 0.100000024)
    kernel[(cdiv(n, BLOCK),)](param, grad, grad_scale, exp_avg, exp_avg_sq, n, 1 - lr * weight_decay, beta1,
                              1 - beta1, beta2, 1 - beta2, eps, lr / correction1, 1 / root_correction2,
                              BLOCK=BLOCK)
    return True
