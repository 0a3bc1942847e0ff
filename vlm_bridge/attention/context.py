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
mask per block pair and overlapping transfers to pay off. The gather's backward sums every rank's
key/value gradients back to the rank that owns the chunk.
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
        return _GatherSequence.apply(tensor, self, dim)

    def order(self) -> torch.Tensor:
        """Global chunk ids in the order an all-gather lays them out (rank by rank, two each)."""
        return torch.tensor([c for r in range(self.size) for c in (r, 2 * self.size - 1 - r)])


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, split: ContextSplit, dim: int) -> torch.Tensor:
        ctx.split, ctx.dim = split, dim
        parts = [torch.empty_like(tensor) for _ in range(split.size)]
        dist.all_gather(parts, tensor.contiguous(), group=split.group)
        chunks = [c for part in parts for c in part.chunk(2, dim=dim)]  # rank order
        by_position = [None] * len(chunks)
        for slot, chunk_id in enumerate(split.order().tolist()):
            by_position[chunk_id] = chunks[slot]
        return torch.cat(by_position, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank used every chunk: sum the gradients, keep the chunks this rank owns.
        grad = grad.contiguous().clone()  # reduced in place: never the caller's buffer
        dist.all_reduce(grad, group=ctx.split.group)
        return ctx.split.take(grad, ctx.dim), None, None


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
