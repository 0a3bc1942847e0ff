"""Vision work shared out over context-parallel ranks.

Without this every CP rank would encode every image and video of the batch (the long-video case CP
is for). Instead the items (one image, one video) are dealt to the ranks, largest first onto the
least-loaded rank, each rank encodes its own, and the features are all-gathered back into item
order, since any rank may hold the tokens of any item. The gather's backward sums the feature
gradients of all ranks and keeps the rows of the items this rank encoded, so the tower's gradients
are those of one full encoding once the data-parallel x context-parallel gradient reduction adds
the ranks up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlm_bridge.attention.context import gather_owned_rows, select_rows


def deal_items(costs: Sequence[int], ranks: int) -> list[int]:
    """Owner rank of each item: largest first onto the least-loaded rank (ties: lowest rank)."""
    load, owner = [0] * ranks, [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[item], load[rank] = rank, load[rank] + costs[item]
    return owner


def encode_split(encode: Callable, inputs: Sequence[tuple[torch.Tensor, Sequence[int]]],
                 out_rows: Sequence[int], cost: Sequence[int], split, out_shape: tuple[int, ...],
                 dtype: torch.dtype, outputs: int = 1):
    """``encode(*inputs)`` computed over the items this CP rank owns, gathered for every item.

    ``inputs``: each tensor with its rows per item (dim 0); ``out_rows``: rows each item gives in
    every output; ``cost``: the work of each item (patches); ``out_shape``: an output's trailing
    dims; ``outputs``: how many tensors ``encode`` returns (1: a tensor, else a tuple of a tensor and
    a list, as DeepStack towers do).
    """
    owner = deal_items(cost, split.size)
    mine = [i for i, r in enumerate(owner) if r == split.rank]
    device = inputs[0][0].device
    if mine:
        local = encode(*(select_rows(t, per, mine) for t, per in inputs))
        local = [local] if outputs == 1 else [local[0], *local[1]]
    else:  # no item here: still join the gathers
        local = [torch.zeros((0, *out_shape), dtype=dtype, device=device) for _ in range(outputs)]
    gathered = [gather_owned_rows(t, owner, list(out_rows), split.group) for t in local]
    return gathered[0] if outputs == 1 else (gathered[0], gathered[1:])
