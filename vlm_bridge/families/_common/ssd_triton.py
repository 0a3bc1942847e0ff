"""The Mamba-2 scan on GPUs through fla-core's chunked simple-GLA Triton kernels.

Simple GLA computes the same recurrence as Mamba-2's SSD with head-wise decay:
``h_t = exp(g_t) h_{t-1} + k_t^T v_t``, ``o_t = scale * q_t h_t``; with ``q = C``, ``k = B``,
``v = dt * x``, ``g = dt * A`` and ``scale = 1`` it is ``y_t = C_t h_t`` of :func:`ssd_scan`.
Packed samples, padding runs and row ends become varlen sequences (``cu_seqlens`` over the
flattened batch), so state never crosses them. fla-core is pure Python (Triton), installed from
the package registry; without it, on CPU, or with ``VLM_BRIDGE_MAMBA_SCAN=torch`` the mixer uses
the torch scan. ``q``/``k``/``v`` and the decay ``g`` go in as fp32 whatever the activation
dtype, as the torch scan (and transformers' own) computes: with bf16 inputs the kernel's error put a
tiny bf16 hybrid MoE model at 1.19x HF-bf16's KL from fp32 on an H200 (the torch scan: 0.90x).
"""

from __future__ import annotations

import functools
import os

import torch

from vlm_bridge.compat.tf32 import matmul_tf32_enabled
from vlm_bridge.parallel import host_to_device, on_host

SCAN_ENV = "VLM_BRIDGE_MAMBA_SCAN"


@functools.cache
def _kernel():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def _backward_ok(device: torch.device) -> bool:
    """fla-core refuses its gated backward on Hopper with Triton 3.4-3.7.0 (wrong results there):
    training then keeps the torch scan, forwards (verify, generation) still use the kernels."""
    import triton

    version = tuple(int(v) for v in triton.__version__.split(".")[:3] if v.isdigit())
    return torch.cuda.get_device_capability(device)[0] != 9 or not (3, 4) <= version < (3, 7, 1)


def available(device: torch.device, needs_grad: bool = False, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the Triton scan can run here (CUDA, fla-core present, not switched off, and a
    correct backward when one is needed). Its dots on fp32 inputs are TF32, so fp32 activations
    take it only where torch's own fp32 matmuls may be TF32 too (verify's fp32 checks turn that
    off, and then get the exact torch scan)."""
    if device.type != "cuda" or os.environ.get(SCAN_ENV, "auto") == "torch" or _kernel() is None:
        return False
    if dtype == torch.float32 and not matmul_tf32_enabled():
        return False
    return not needs_grad or _backward_ok(device)


def _cu_seqlens(batch: int, seq: int, runs: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Sequence starts over the flattened ``[b * s]`` tokens: every row, and every run inside it.
    Worked out on the host (from the host original of ``runs``): a ``nonzero`` on the GPU would
    make the host wait in every Mamba layer. Kept on ``runs``, which every layer of a forward shares."""
    if runs is None:
        return _starts(batch, seq, None, device)
    if getattr(runs, "_cu_seqlens", None) is None:
        runs._cu_seqlens = _starts(batch, seq, on_host(runs), device)
    return runs._cu_seqlens


def _starts(batch: int, seq: int, host_runs: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    rows = torch.arange(batch)[:, None].expand(batch, seq)
    ids = rows * (seq + 1) + (host_runs if host_runs is not None else 0)
    flat = ids.reshape(-1)
    starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    edges = [torch.zeros(1, dtype=torch.long), starts, torch.full((1,), batch * seq, dtype=torch.long)]
    return host_to_device(torch.cat(edges), device)


def triton_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                runs: torch.Tensor | None) -> torch.Tensor:
    """Shapes as :func:`~vlm_bridge.families._common.ssd_scan.ssd_scan`; returns fp32 ``y``
    ``[b, s, heads, head_dim]`` (no final state: training and full forwards only)."""
    batch, seq, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    dtype = torch.float32  # see the module docstring
    q = C.repeat_interleave(per_group, dim=2).to(dtype).reshape(1, batch * seq, heads, -1)
    k = B.repeat_interleave(per_group, dim=2).to(dtype).reshape(1, batch * seq, heads, -1)
    v = (x.float() * dt[..., None]).to(dtype).reshape(1, batch * seq, heads, head_dim)
    g = (dt * A.float()).reshape(1, batch * seq, heads)
    out, _ = _kernel()(q, k, v, g=g, scale=1.0, cu_seqlens=_cu_seqlens(batch, seq, runs, x.device))
    return out.float().reshape(batch, seq, heads, head_dim)
