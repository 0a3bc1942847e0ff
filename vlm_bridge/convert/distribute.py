"""Full tensor <-> this rank's shard, derived from Megatron-Core's own parameter metadata.

Megatron tags every TP-split parameter with ``tensor_model_parallel=True`` and ``partition_dim``;
nothing here knows parameter names. The only extra fact comes from the weight table: a tensor built
by concatenating ``chunks`` parts (GLU gate/up) is split per part, because Megatron's fused
``linear_fc1`` holds ``[gate_shard; up_shard]`` on each rank.

Pipeline stages own different layers; :func:`global_param_names` maps a stage's local layer
indices back to global ones using each layer's ``layer_number``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)\.")
_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def is_expert(param: torch.Tensor) -> bool:
    """Megatron marks expert weights as not all-reduced over data parallel (they are EP-split)."""
    return getattr(param, "allreduce", True) is False


Chunks = int | tuple[int, ...]


def _parts(t: torch.Tensor, chunks: Chunks, dim: int, tp: int = 1) -> tuple[torch.Tensor, ...]:
    """``t`` cut into its table parts: ``chunks`` equal parts, or parts of the given full sizes
    (divided by ``tp`` when ``t`` is one rank's shard)."""
    if isinstance(chunks, (tuple, list)):
        return t.split([c // tp for c in chunks], dim=dim)
    return t.chunk(chunks, dim=dim)


def shard(full: torch.Tensor, param: torch.Tensor, chunks: Chunks = 1) -> torch.Tensor:
    """This TP rank's piece of ``full`` for ``param``."""
    if not is_tp_sharded(param):
        return full
    if is_expert(param):
        tp = parallel_state.get_expert_tensor_parallel_world_size()
        rank = parallel_state.get_expert_tensor_parallel_rank()
    else:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
    return rank_piece(full, chunks, tp, rank, param.partition_dim)


def rank_piece(full: torch.Tensor, chunks: Chunks, tp: int, rank: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank`` of ``tp``'s piece of a full tensor made of ``chunks`` parts (each part is
    split on its own: a plain ``chunk`` would mix the parts)."""
    parts = [p.chunk(tp, dim=dim)[rank] for p in _parts(full, chunks, dim)]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def _tp_group(param: torch.Tensor):
    """The group that splits ``param`` by TP (expert TP for experts); None when it is not split."""
    if not is_tp_sharded(param):
        return None
    return (parallel_state.get_expert_tensor_parallel_group() if is_expert(param)
            else parallel_state.get_tensor_model_parallel_group())


def tp_world_size(param: torch.Tensor) -> int:
    """How many ranks share ``param`` by TP (expert TP for experts); 1 when it is not TP-split."""
    group = _tp_group(param)
    return 1 if group is None else dist.get_world_size(group)


def gather(local: torch.Tensor, param: torch.Tensor, chunks: Chunks = 1,
           first_only: bool = False) -> torch.Tensor | None:
    """Inverse of :func:`shard`: every TP rank of the group receives the full tensor; with
    ``first_only`` the group's first rank alone does and the others get None (an export writes each
    tensor once: a full copy on every rank, and the pieces beside it, held 2.5x the largest tensor
    on each). Expert weights are split over the expert-TP group, whose first rank need not be the
    one that writes, so they still reach every rank."""
    group = _tp_group(param)
    tp = 1 if group is None else dist.get_world_size(group)
    if tp == 1:  # no copies: a streaming export holds the largest tensor once
        return local.detach()
    source = local.detach().contiguous()
    dim = param.partition_dim
    first = dist.get_global_rank(group, 0)
    to_first = first_only and not is_expert(param)
    if to_first and dist.get_rank() != first:
        dist.gather(source, None, dst=first, group=group)
        return None
    whole_rows = chunks == 1 and dim == 0  # the pieces land in the full tensor itself: no concatenation
    full = (torch.empty((tp * source.shape[0], *source.shape[1:]), dtype=source.dtype, device=source.device)
            if whole_rows else None)
    pieces = list(full.chunk(tp)) if whole_rows else [torch.empty_like(source) for _ in range(tp)]
    if to_first:
        dist.gather(source, pieces, dst=first, group=group)
    else:
        dist.all_gather(pieces, source, group=group)
    if whole_rows:
        return full
    per_rank = [_parts(p, chunks, dim, tp) for p in pieces]
    return torch.cat([torch.cat([r[c] for r in per_rank], dim=dim) for c in range(len(per_rank[0]))], dim=dim)


def global_param_names(model: torch.nn.Module, buffers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``{global name: parameter}`` for this rank, with decoder layers numbered globally, plus the
    persistent buffers whose global names are in ``buffers`` (a weight table may name one, e.g. a
    router's expert bias, which Megatron keeps as a buffer)."""
    offsets = {}
    decoder = getattr(getattr(model, "language_model", None), "decoder", None)
    if decoder is not None:
        offsets = {str(i): layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}
    # Expert parallelism: rank r holds experts [r * local, (r + 1) * local).
    first_expert = 0
    if decoder is not None:
        moe = next((m for m in model.modules() if hasattr(m, "num_local_experts")), None)
        if moe is not None:
            first_expert = parallel_state.get_expert_model_parallel_rank() * moe.num_local_experts

    def global_name(name: str) -> str:
        match = _LAYER.match(name)
        if match:
            name = f"{match.group(1)}{offsets[match.group(2)]}.{name[match.end():]}"
        expert = _EXPERT.search(name)
        if expert:
            index = first_expert + int(expert.group(2))
            name = f"{name[:expert.start()]}{expert.group(1)}{index}.{name[expert.end():]}"
        return name

    out: dict[str, torch.Tensor] = {global_name(name): p for name, p in model.named_parameters()}
    wanted = set(buffers)
    if wanted:
        out.update({n: b for n, b in ((global_name(name), b) for name, b in model.named_buffers())
                    if n in wanted})
    return out
