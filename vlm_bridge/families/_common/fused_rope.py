"""Rotary embedding of queries and keys in one Triton kernel per direction.

Megatron without Transformer Engine applies RoPE as torch ops on ``[s, b, heads, dim]``: cos and
sin of the angles (recomputed in every layer), two casts, two products, a negation and a
concatenation for the rotated half, an add, and a final concatenation with the unrotated channels,
about ten passes over each query and key tensor forward and as many backward. In a 7B step that is
most of the ~1,700 ``cat`` calls of a profiled step, and a rotary ViT repeats it in every one of its layers.

Here each (token, row) program reads its angles once, takes cos and sin in fp32 registers and
rotates every head in one read and one write; the backward is the transposed rotation
(``dx1 = dy1 cos + dy2 sin``, ``dx2 = dy2 cos - dy1 sin``). The result is rounded once, where the
torch ops round after every op. Angles may differ between the two halves (not assumed equal) and
per batch row (3-D MRoPE of several rows).

Megatron calls :func:`fused_apply_rotary_pos_emb` (its Transformer Engine entry point) when the
config's ``apply_rope_fusion`` is set: :func:`install` puts it there. Shapes it does not cover (an
interleaved rotary, a row wider than one program) run Megatron's torch code.
"""

from __future__ import annotations

import functools
import os

import torch

from vlm_bridge.families._common.fused_triton import passes_self_check, triton_runs_on

_MAX_HALF = 512
# (token, batch row) pairs one program rotates: one pair (16 heads of 80 channels: 2.5 KB read,
# 2.5 KB written) is a small program for a memory-bound kernel.
TOKENS_PER_PROGRAM = 4


def enabled() -> bool:
    """The fused RoPE is used on GPUs unless ``VLM_BRIDGE_FUSED_ROPE=0``."""
    return os.environ.get("VLM_BRIDGE_FUSED_ROPE", "1") != "0"


def install() -> bool:
    """Make this Megatron's fused RoPE (what ``apply_rope_fusion=True`` calls); True if it is."""
    from megatron.core.models.common.embeddings import rope_utils

    if not enabled():
        return False
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    return rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope(X, F, Y, rows, batch, heads, rot, dim, xs_s, xs_b, xs_h, fs_s, fs_b, BACKWARD: tl.constexpr,
             BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr):
        # BLOCK_S (token, row) pairs x BLOCK_H heads x the rotary half per program
        row = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        live = row < rows
        s, b = row // batch, row % batch
        half = rot // 2
        cols = tl.arange(0, HALF)
        inside = cols < half
        angles = F + (s * fs_s + b * fs_b)[:, None] + cols[None, :]
        per_row = live[:, None] & inside[None, :]
        f1 = tl.load(angles, mask=per_row, other=0.0).to(tl.float32)
        f2 = tl.load(angles + half, mask=per_row, other=0.0).to(tl.float32)
        c1, s1 = tl.cos(f1)[:, None, :], tl.sin(f1)[:, None, :]
        c2, s2 = tl.cos(f2)[:, None, :], tl.sin(f2)[:, None, :]
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        head_ok = live[:, None, None] & (h[None, :, None] < heads)
        where = head_ok & inside[None, None, :]
        src = X + (s * xs_s + b * xs_b)[:, None, None] + h[None, :, None] * xs_h
        dst = Y + (row * heads * dim)[:, None, None] + h[None, :, None] * dim
        c = cols[None, None, :]
        x1 = tl.load(src + c, mask=where, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + c, mask=where, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(dst + c, y1.to(Y.dtype.element_ty), mask=where)
        tl.store(dst + half + c, y2.to(Y.dtype.element_ty), mask=where)
        if PASS > 0:  # channels past the rotary ones are copied
            rest = tl.arange(0, PASS)[None, None, :]
            keep = head_ok & (rest < dim - rot)
            tail = tl.load(src + rot + rest, mask=keep, other=0.0)
            tl.store(dst + rot + rest, tail, mask=keep)

    return rope, triton.next_power_of_2, triton.cdiv


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    rope, next_pow2, cdiv = _kernel()
    s, b, heads, dim = x.shape
    rot = freqs.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(s, b, heads, dim, dtype=x.dtype, device=x.device)
    block_h = min(next_pow2(heads), 16)
    tokens = TOKENS_PER_PROGRAM
    fs_b = freqs.stride(1) if freqs.shape[1] > 1 else 0
    rope[(cdiv(s * b, tokens), cdiv(heads, block_h))](
        x, freqs, y, s * b, b, heads, rot, dim, x.stride(0), x.stride(1), x.stride(2), freqs.stride(0), fs_b,
        BACKWARD=backward, BLOCK_S=tokens, BLOCK_H=block_h, HALF=next_pow2(rot // 2),
        PASS=next_pow2(dim - rot) if dim > rot else 0, num_warps=4)
    return y


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, freqs):
        ctx.save_for_backward(freqs)
        return _launch(x, freqs, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return _launch(dy, freqs, backward=True), None


def covers(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> bool:
    """Whether the kernel takes these inputs: ``[s, b, heads, dim]`` on a device Triton runs on,
    angles ``[s, 1 or b, 1, rot]`` with an even ``rot <= dim``, halves not interleaved."""
    return (not interleaved and t.dim() == 4 and freqs.dim() == 4 and triton_runs_on(t)
            and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and freqs.shape[0] == t.shape[0] and freqs.shape[1] in (1, t.shape[1]) and freqs.shape[2] == 1
            and freqs.shape[-1] % 2 == 0 and 0 < freqs.shape[-1] <= t.shape[-1]
            and freqs.shape[-1] // 2 <= _MAX_HALF and passes_self_check("RoPE", t.device, _self_check))


def _self_check(device: torch.device) -> None:
    """Both directions on a small case (a query view, per-row angles, a pass-through tail) against
    Megatron's torch RoPE in fp32."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(5, 2, 4, 12, generator=gen).to(device)[:, :, :3]
    freqs = (torch.randn(5, 2, 1, 8, generator=gen) * 3).to(device)
    dy = torch.randn(5, 2, 3, 12, generator=gen).to(device)
    leaf = x.clone().requires_grad_()
    want = _apply_rotary_pos_emb_bshd(leaf, freqs)
    want.backward(dy)
    torch.testing.assert_close(_launch(x, freqs, backward=False), want.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_launch(dy, freqs, backward=True), leaf.grad, rtol=1e-4, atol=1e-4)


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
                               **_unused) -> torch.Tensor:
    """Megatron's ``_apply_rotary_pos_emb_bshd`` (``mscale`` 1) in one kernel per direction; the
    torch code where :func:`covers` says no."""
    if not covers(t, freqs, interleaved):
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return _FusedRope.apply(t, freqs.float() if freqs.dtype != torch.float32 else freqs)
