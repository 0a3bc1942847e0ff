"""Context parallelism without Transformer Engine: how a sequence is split over the CP ranks, and
the key/value exchange attention needs.

Load balance: a (padded) sequence of ``S`` tokens is cut into ``2 * cp`` equal chunks and rank
``r`` holds chunks ``r`` and ``2 * cp - 1 - r``, so under a causal mask every rank has the same
attention work (an early chunk sees few keys, its partner many). This is Megatron's own layout.

Attention: every rank all-gathers the keys and values of the whole sequence and attends its two
query chunks to them, each chunk as a query block at its global offset through the structural
:class:`~vlm_bridge.attention.mask.AttentionMask` (its predicates index global positions, so
packed samples, padding, image spans and sliding windows stay exact). We gather rather than pass
K/V around a ring because with grouped-query attention K and V are a small fraction of the
activations (a 7B model with 4 KV heads of 28 query heads: 2 KB a token in bf16, 128 MB a layer at 64k
tokens), and any mask then needs nothing beyond the one structural predicate; a ring would need a
mask per block pair and overlapping transfers to pay off. The gather (shared with the vision
tower's item gather) sums every rank's key/value gradients back to the rank that owns the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class Unsplit:
    """A stand-in CP group of size 1, for Megatron modules that would slice by their CP group
    (its multimodal rotary embedding): we slice positions ourselves, once."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


UNSPLIT = Unsplit()


@dataclass(frozen=True)
class ContextSplit:
    """This rank's share of a sequence of ``length`` tokens (``length`` divisible by ``2 * size``)."""

    size: int
    rank: int
    length: int
    group: object = None

    @property
    def chunk(self) -> int:
        return self.length // (2 * self.size)

    def chunks(self) -> list[tuple[int, int]]:
        """The global ``[start, end)`` of this rank's two chunks, in the order they are held."""
        c = self.chunk
        return [(self.rank * c, (self.rank + 1) * c),
                ((2 * self.size - 1 - self.rank) * c, (2 * self.size - self.rank) * c)]

    def index(self, device) -> torch.Tensor:
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.chunks()])

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of a full-length tensor (along ``dim``)."""
        return torch.cat([tensor.narrow(dim, a, b - a) for a, b in self.chunks()], dim=dim)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The full-length tensor from every rank's share (autograd: gradients return to owners)."""
        chunks = 2 * self.size
        owner = [c if c < self.size else chunks - 1 - c for c in range(chunks)]
        full = gather_owned_rows(tensor.movedim(dim, 0), owner, [self.chunk] * chunks, self.group)
        return full.movedim(0, dim)


def select_rows(tensor: torch.Tensor, per_item: list[int], items: list[int]) -> torch.Tensor:
    """The dim-0 rows of ``items`` (in that order) of a tensor whose items have ``per_item`` rows."""
    starts = [0]
    for n in per_item:
        starts.append(starts[-1] + n)
    return torch.cat([tensor[starts[i]:starts[i + 1]] for i in items]) if items else tensor[:0]


def gather_owned_rows(local: torch.Tensor, owner: list[int], rows: list[int], group) -> torch.Tensor:
    """Items dealt out to the ranks of ``group`` (``owner[i]``, ``rows[i]`` dim-0 rows each; every
    rank holds its items' rows in item order), all-gathered back into item order. The backward
    sums every rank's gradient and keeps the rows of this rank's items."""
    return _GatherOwnedRows.apply(local, list(owner), list(rows), group)


class _GatherOwnedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, owner: list[int], rows: list[int], group) -> torch.Tensor:
        ctx.owner, ctx.rows, ctx.group = owner, rows, group
        size = dist.get_world_size(group)
        held = [sum(n for n, r in zip(rows, owner) if r == rank) for rank in range(size)]
        width = max(held)  # ranks may hold different amounts: pad to one shape for all_gather
        padded = torch.cat([local, local.new_zeros(width - local.shape[0], *local.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        pieces, cursor = [], [0] * size
        for item, rank in enumerate(owner):
            pieces.append(parts[rank][cursor[rank]:cursor[rank] + rows[item]])
            cursor[rank] += rows[item]
        return torch.cat(pieces) if pieces else local

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # reduced in place: never the caller's buffer
        dist.all_reduce(grad, group=ctx.group)  # every rank used every item
        rank = dist.get_rank(ctx.group)
        mine = [i for i, r in enumerate(ctx.owner) if r == rank]
        return select_rows(grad, ctx.rows, mine), None, None, None


def current_split(length: int) -> ContextSplit | None:
    """This rank's split of a sequence of ``length`` (already padded), or None without CP."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return None
    if length % (2 * size):
        raise ValueError(f"sequence length {length} is not a multiple of 2 x cp = {2 * size}")
    return ContextSplit(size, parallel_state.get_context_parallel_rank(), length,
                        parallel_state.get_context_parallel_group())


def context_parallel_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def padded_length(length: int, cp: int) -> int:
    """``length`` rounded up to a multiple of ``2 * cp`` (the chunk count)."""
    step = 2 * cp
    return -(-length // step) * step


def pad_tokens(tensor: torch.Tensor, length: int, dim: int, value) -> torch.Tensor:
    """``tensor`` padded with ``value`` along ``dim`` to ``length``."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def local_tokens(tensor: torch.Tensor, dim: int = 1, value=0) -> torch.Tensor:
    """This CP rank's tokens of a full ``[..., s, ...]`` tensor (padded as the model pads); the
    tensor itself without CP. The trainer takes its loss mask through this."""
    cp = context_parallel_size()
    if cp == 1:
        return tensor
    length = padded_length(tensor.shape[dim], cp)
    return current_split(length).take(pad_tokens(tensor, length, dim, value), dim)
