"""Pure-torch pieces of a Mamba-2 layer: the causal depthwise conv and the chunked SSD scan.

Both run on CPU and CUDA without ``mamba_ssm`` / ``causal_conv1d`` and both understand packed rows:
``runs`` (``[b, s]``, from :func:`segment_runs`) numbers the contiguous stretches of a row, and
nothing (conv taps or SSM state) crosses from one stretch to the next, so a packed row gives the
outputs of running each of its samples alone.

The scan follows the SSD "chunked" formulation: within a chunk the recurrence is a masked
attention-like product whose weights are ``exp`` of differences of the cumulative log-decay; the
state left at each chunk end is carried across chunks by the same construction one level up. A
segment boundary is simply another place where a weight is forced to zero (``-inf`` before the
``exp``), at both levels. The recurrence is accumulated in fp32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vlm_bridge.compat.tf32 import matmul_tf32
from vlm_bridge.parallel import host_to_device


def segment_runs(segment_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``[b, s]`` run index per token (0, 1, 2, ... along each row), or None for unpacked rows.

    A run is a maximal stretch of equal ids: each packed sample is one, and so is each stretch of
    padding (-1), which keeps padding apart from the samples around it whatever its position.
    """
    if segment_ids is None:
        return None
    changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return F.pad(changes.cumsum(dim=1), (1, 0))


class ConvFixups(NamedTuple):
    """The positions of a packed row whose conv window reaches into an earlier run, and for each
    its ``k`` taps: the token each reads (clamped to 0) and whether it is of the same run. They
    depend only on the runs, so a model computes them once per micro-batch for all its layers."""

    rows: torch.Tensor  # [n]
    pos: torch.Tensor  # [n]
    reads: torch.Tensor  # [n, k]: tap j reads pos - j
    keep: torch.Tensor  # [n, k]

    def to(self, device: torch.device) -> ConvFixups:
        return ConvFixups(*(host_to_device(t, device) for t in self))


def conv_fixups(runs: torch.Tensor, k: int) -> ConvFixups | None:
    """:class:`ConvFixups` of ``runs`` ``[b, s]`` for a kernel of ``k`` taps; None where no window
    crosses a run start. Run ids never decrease along a row, so a window crosses one exactly where
    the id ``k - 1`` tokens back (clamped to the row start, where the conv's zero padding is
    already right) differs. One host sync."""
    if k == 1:
        return None
    back = torch.cat([runs[:, :1].expand(-1, k - 1), runs], dim=1)[:, :runs.shape[1]]
    rows, pos = torch.nonzero(runs != back, as_tuple=True)
    if rows.numel() == 0:
        return None
    reads = pos[:, None] - torch.arange(k, device=runs.device)
    keep = (reads >= 0) & (runs[rows[:, None], reads.clamp(min=0)] == runs[rows, pos][:, None])
    return ConvFixups(rows, pos, reads.clamp(min=0), keep)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, runs: torch.Tensor | None = None,
    fixups: ConvFixups | None = None,
) -> torch.Tensor:
    """Depthwise causal conv of ``x`` ``[b, c, s]`` with ``weight`` ``[c, 1, k]`` (nn.Conv1d layout).

    ``out[t] = bias + sum_j weight[k - 1 - j] * x[t - j]``. With ``runs`` a tap only sees tokens of
    its own run. Only the first ``k - 1`` tokens of a run can see another run's tokens, so the
    whole row goes through one conv call and just those few positions are recomputed with their
    foreign taps left out (per-tap masking of every position cost a copy of the row per tap).
    ``fixups`` (from :func:`conv_fixups` of the same ``runs``) saves deriving them again.
    """
    x = x.to(weight.dtype)
    channels, _, k = weight.shape
    out = F.conv1d(x, weight, bias, padding=k - 1, groups=channels)[..., :x.shape[-1]]
    if runs is None:
        return out
    fix = fixups if fixups is not None else conv_fixups(runs, k)
    if fix is None:
        return out
    windows = x[fix.rows[:, None], :, fix.reads]  # [n, k, c]
    kernel = weight[:, 0, :].flip(-1).t()  # [k, c]: row j is weight[k - 1 - j]
    fixed = (windows * (fix.keep[..., None].to(x.dtype) * kernel)).sum(1)
    if bias is not None:
        fixed = fixed + bias
    return out.transpose(1, 2).index_put((fix.rows, fix.pos), fixed.to(out.dtype)).transpose(1, 2)


def _masked_segsum(log_decay: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``[..., T] -> [..., T, T]``: entry ``[i, j]`` is ``sum(log_decay[j + 1 : i + 1])`` for
    ``j <= i`` and ``-inf`` above the diagonal or where ``keep`` (broadcast to ``[..., T, T]``) is
    False.

    Built by a cumulative sum of a masked copy rather than as ``cumsum[i] - cumsum[j]``: that
    difference of two large numbers loses precision over long chunks.
    """
    length = log_decay.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=log_decay.device)
    # grid[..., m, j] = log_decay[m] where m > j: summing over m <= i gives the entry [i, j].
    grid = log_decay[..., :, None].expand(*log_decay.shape, length)
    sums = grid.masked_fill(~torch.tril(ones, diagonal=-1), 0.0).cumsum(dim=-2)
    valid = torch.tril(ones)
    if keep is not None:
        valid = valid & keep
    return sums.masked_fill(~valid, float("-inf"))


def _to_chunks(t: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    """``[b, s, ...] -> [b, chunks, chunk_size, ...]``, zero-padding the sequence at the end."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk_size, *t.shape[2:])


SCAN_TF32_ENV = "VLM_BRIDGE_SCAN_TF32"


@contextlib.contextmanager
def scan_matmul_precision(x: torch.Tensor) -> Iterator[None]:
    """TF32 tensor-core matmuls for the scan's fp32 products when the activations are half
    precision on a GPU: its inputs then carry 8 (bf16) or 11 (fp16) significant bits, TF32 keeps
    11, and the accumulation stays fp32. Without it the products run as fp32 FMA GEMMs, about 8x
    slower on an H200. fp32 activations keep exact fp32 products (parity checks at fp32), and so
    does everything under ``VLM_BRIDGE_SCAN_TF32=0``."""
    half = x.dtype in (torch.bfloat16, torch.float16)
    with matmul_tf32(True if x.is_cuda and half and os.environ.get(SCAN_TF32_ENV, "1") != "0" else None):
        yield


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    runs: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t`` (no D term).

    Shapes: ``x`` ``[b, s, heads, head_dim]``, ``dt`` ``[b, s, heads]`` (already softplus-ed and
    clamped), ``A`` ``[heads]`` (negative), ``B`` / ``C`` ``[b, s, groups, d_state]`` (heads are
    split evenly over groups), ``runs`` ``[b, s]`` (state reset where it changes),
    ``initial_state`` ``[b, heads, head_dim, d_state]`` (the state before the first token, kept
    only while the first run lasts). Returns fp32 ``y`` ``[b, s, heads, head_dim]`` and the fp32
    state after the last token (of the last run) ``[b, heads, head_dim, d_state]``.
    """
    with scan_matmul_precision(x):
        return _ssd_scan(x, dt, A, B, C, chunk_size, runs, initial_state)


def _ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              chunk_size: int, runs: torch.Tensor | None, initial_state: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    per_group = heads // groups
    # B and C stay per group: the heads of a group share them, so C.B is computed once per group
    # and broadcast over its heads, never materialised per head. Head h is (h // per_group,
    # h % per_group), the order of heads in x and the split of heads over groups.
    x, dt = x.float(), dt.float()
    B, C = B.float(), C.float()
    pad = -seq % chunk_size
    packed = runs is not None
    if packed:
        # Chunk padding continues the last run with dt = 0 (no input, no decay): the state holds.
        runs = torch.cat([runs, runs[:, -1:].expand(-1, pad)], dim=1).reshape(batch, -1, chunk_size)
    xdt = _to_chunks(x * dt[..., None], pad, chunk_size)  # [b, c, l, h, p]
    xdt = xdt.unflatten(3, (groups, per_group))  # [b, c, l, g, r, p]
    B, C = _to_chunks(B, pad, chunk_size), _to_chunks(C, pad, chunk_size)  # [b, c, l, g, n]
    log_decay = _to_chunks(dt * A.float(), pad, chunk_size).permute(0, 3, 1, 2)  # [b, h, c, l]
    cum = log_decay.cumsum(dim=-1)

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [b, h, ...] -> [b, g, r, ...]
        return t.unflatten(1, (groups, per_group))

    # 1. Within each chunk: y_l += sum_{s <= l} (C_l . B_s) * exp(decay s -> l) * xdt_s.
    same_run = (runs[..., :, None] == runs[..., None, :])[:, None] if packed else None
    decay = by_group(torch.exp(_masked_segsum(log_decay, same_run)))  # [b, g, r, c, l, s]
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B)[:, :, None] * decay
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", scores, xdt)

    # 2. Each chunk's own contribution to the state at its last position. The decay after l is a
    # suffix sum of its own (not total - cumsum[l]), so it depends on no token before l even
    # through rounding: padding earlier in the chunk cannot leak into it.
    suffix = log_decay.flip(-1).cumsum(dim=-1).flip(-1)  # sum over m >= l
    to_end = torch.exp(F.pad(suffix[..., 1:], (0, 1)))  # [b, h, c, l]
    if packed:
        chunk_end_runs = runs[:, :, -1]  # [b, c]
        to_end = to_end * (runs == chunk_end_runs[..., None])[:, None]
    weighted = xdt * by_group(to_end).permute(0, 3, 4, 1, 2)[..., None]  # [b, c, l, g, r, p]
    local_states = torch.einsum("bclgn,bclgrp->bcgrpn", B, weighted).flatten(2, 3)  # [b, c, h, p, n]

    # 3. Carry states across chunks: index 0 is the initial state, i > 0 the end of chunk i - 1.
    if initial_state is None:
        initial_state = local_states.new_zeros(batch, heads, head_dim, d_state)
    states = torch.cat([initial_state.float()[:, None], local_states], dim=1)
    same_boundary = None
    if packed:  # the initial state belongs to the first run
        boundary_runs = torch.cat([runs[:, :1, 0], chunk_end_runs], dim=1)  # [b, c + 1]
        same_boundary = (boundary_runs[:, :, None] == boundary_runs[:, None, :])[:, None]
    chunk_totals = F.pad(cum[..., -1], (1, 0))  # [b, h, c + 1]
    carry = torch.exp(_masked_segsum(chunk_totals, same_boundary))  # [b, h, c + 1, c + 1]
    states = torch.einsum("bhiz,bzhpn->bihpn", carry, states)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. What each chunk's start state adds to its outputs.
    from_start = torch.exp(cum)  # [b, h, c, l]
    if packed:
        from_start = from_start * (runs == boundary_runs[:, :-1, None])[:, None]
    start_states = start_states.unflatten(2, (groups, per_group))  # [b, c, g, r, p, n]
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", C, start_states) * by_group(from_start).permute(
        0, 3, 4, 1, 2)[..., None]
    return y.reshape(batch, -1, heads, head_dim)[:, :seq], final_state


class _RecomputedScan(torch.autograd.Function):
    """The scan keeping only its inputs for the backward, which runs it again with autograd on.

    Its fp32 intermediates (per-head decay and score matrices of every chunk) are tens of times
    the size of its inputs. Unlike ``torch.utils.checkpoint``, the backward's own products run
    under :func:`scan_matmul_precision` too.
    """

    @staticmethod
    def forward(ctx, chunk_size: int, runs: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor,
                A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        ctx.chunk_size, ctx.runs = chunk_size, runs
        ctx.save_for_backward(x, dt, A, B, C)
        return ssd_scan(x, dt, A, B, C, chunk_size, runs)[0]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        needs = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            y, _ = ssd_scan(*inputs, ctx.chunk_size, ctx.runs)
        wanted = [t for t in inputs if t.requires_grad]
        with scan_matmul_precision(inputs[0]):
            grads = iter(torch.autograd.grad(y, wanted, grad_y) if wanted else ())
        return None, None, *(next(grads) if t.requires_grad else None for t in inputs)


def recomputed_ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        chunk_size: int, runs: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ssd_scan`'s ``y`` for training: the same values, with the backward recomputing the
    forward instead of keeping its intermediates (no final state, no initial state)."""
    return _RecomputedScan.apply(chunk_size, runs, x, dt, A, B, C)
