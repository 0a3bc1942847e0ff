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

import torch
import torch.nn.functional as F


def segment_runs(segment_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``[b, s]`` run index per token (0, 1, 2, ... along each row), or None for unpacked rows.

    A run is a maximal stretch of equal ids: each packed sample is one, and so is each stretch of
    padding (-1), which keeps padding apart from the samples around it whatever its position.
    """
    if segment_ids is None:
        return None
    changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return F.pad(changes.cumsum(dim=1), (1, 0))


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, runs: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal conv of ``x`` ``[b, c, s]`` with ``weight`` ``[c, 1, k]`` (nn.Conv1d layout).

    ``out[t] = bias + sum_j weight[k - 1 - j] * x[t - j]``. With ``runs`` a tap only sees tokens of
    its own run; that path is k shifted multiply-adds instead of one conv call.
    """
    x = x.to(weight.dtype)
    channels, _, k = weight.shape
    seq = x.shape[-1]
    if runs is None:
        return F.conv1d(x, weight, bias, padding=k - 1, groups=channels)[..., :seq]
    taps = weight[:, 0, :]
    out = x * taps[:, k - 1, None]
    for j in range(1, min(k, seq + 1)):
        shifted = F.pad(x, (j, 0))[..., :seq]
        same_run = F.pad(runs, (j, 0), value=-1)[:, :seq] == runs
        out = out + shifted * same_run[:, None, :].to(x.dtype) * taps[:, k - 1 - j, None]
    return out if bias is None else out + bias[:, None]


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
    batch, seq, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(heads // groups, dim=2)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    pad = -seq % chunk_size
    packed = runs is not None
    if packed:
        # Chunk padding continues the last run with dt = 0 (no input, no decay): the state holds.
        runs = torch.cat([runs, runs[:, -1:].expand(-1, pad)], dim=1).reshape(batch, -1, chunk_size)
    xdt = _to_chunks(x * dt[..., None], pad, chunk_size)  # [b, c, l, h, p]
    B, C = _to_chunks(B, pad, chunk_size), _to_chunks(C, pad, chunk_size)  # [b, c, l, h, n]
    log_decay = _to_chunks(dt * A.float(), pad, chunk_size).permute(0, 3, 1, 2)  # [b, h, c, l]
    cum = log_decay.cumsum(dim=-1)

    # 1. Within each chunk: y_l += sum_{s <= l} (C_l . B_s) * exp(decay s -> l) * xdt_s.
    same_run = (runs[..., :, None] == runs[..., None, :])[:, None] if packed else None
    decay = torch.exp(_masked_segsum(log_decay, same_run))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. Each chunk's own contribution to the state at its last position. The decay after l is a
    # suffix sum of its own (not total - cumsum[l]), so it depends on no token before l even
    # through rounding: padding earlier in the chunk cannot leak into it.
    suffix = log_decay.flip(-1).cumsum(dim=-1).flip(-1)  # sum over m >= l
    to_end = torch.exp(F.pad(suffix[..., 1:], (0, 1)))  # [b, h, c, l]
    if packed:
        chunk_end_runs = runs[:, :, -1]  # [b, c]
        to_end = to_end * (runs == chunk_end_runs[..., None])[:, None]
    local_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)

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
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, start_states, from_start)
    return y.reshape(batch, -1, heads, head_dim)[:, :seq], final_state
