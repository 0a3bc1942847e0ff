"""The LoRA / DoRA wrapper of one Megatron ``ColumnParallelLinear`` / ``RowParallelLinear``.

Shapes per TP rank (``r`` = rank, ``s`` = alpha / r):

* column-parallel base (output sharded): ``lora_A [r, in]`` replicated, ``lora_B [out/tp, r]``
  sharded on dim 0; ``A x`` passes through ``copy_to_tensor_model_parallel_region`` so the
  gradients of ``A`` and of ``x`` are summed over TP;
* row-parallel base (input sharded): ``lora_A [r, in/tp]`` sharded on dim 1; the partial ``A x``
  is all-reduced (``reduce_from_tensor_model_parallel_region``) before ``lora_B [out, r]``.

Sharded adapter tensors carry Megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes
(replicated ones the defaults), so ``convert.distribute.shard`` / ``gather`` work on them; a GLU
``linear_fc1`` is split per part (``tp_chunks=2``) like its weight.

DoRA follows HF PEFT (``peft/tuners/lora/dora.py``): ``W' = m * (W + s B A) / ||W + s B A||_row``
with the row norm recomputed each forward and *detached* (DoRA paper, section 4.3); ``m`` is
sharded like ``B`` (column) or replicated (row, where squared norms are all-reduced over TP). The
output is computed like HF: ``y + (m/n - 1) (W x) + (m/n) s B A x`` with ``y`` the base output.
Dropout is applied to the adapter input only, as in HF PEFT.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import (
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from vlm_bridge.convert.distribute import shard
from vlm_bridge.peft.config import LoraConfig

ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude")


def full_shape(p: torch.Tensor) -> list[int]:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return shape


def seeded(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class LoraLinear(torch.nn.Module):
    """A Megatron parallel linear plus a low-rank (optionally DoRA) adapter; returns ``(out, bias)``."""

    def __init__(self, base: torch.nn.Module, cfg: LoraConfig, name: str,
                 tp_chunks: int | tuple[int, ...] = 1) -> None:
        super().__init__()
        if base.weight is None:
            raise ValueError(f"{name}: LoRA needs the layer's own weight (tied output layer?)")
        if base.config.sequence_parallel:
            raise NotImplementedError("LoRA with sequence parallelism is not supported")
        self.base_layer = base
        self.cfg = cfg
        # 2 for a GLU fc1 (rows [gate; up]), part sizes for Mamba's in_proj; each part TP-split
        self.tp_chunks = tp_chunks
        self.column = isinstance(base, ColumnParallelLinear)
        self.scaling, self.p_drop, self.use_dora = cfg.scaling, cfg.dropout, cfg.use_dora
        self.merged = False
        self._saved_weight: torch.Tensor | None = None
        w = base.weight
        out_features, in_features = w.shape
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_A = torch.nn.Parameter(torch.empty(cfg.rank, in_features, **kw))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, cfg.rank, **kw))
        sharded = self.lora_B if self.column else self.lora_A
        set_tensor_model_parallel_attributes(sharded, True, 0 if self.column else 1, 1)
        set_defaults_if_not_set_tensor_model_parallel_attributes(self.lora_A if self.column else self.lora_B)
        # Kaiming-uniform (a=sqrt(5)) like nn.Linear / HF PEFT, with the fan-in of the full layer.
        bound = 1.0 / math.sqrt(full_shape(self.lora_A)[1])
        full_a = torch.rand(full_shape(self.lora_A), generator=seeded(name, cfg.seed)) * 2 - 1
        with torch.no_grad():
            self.lora_A.copy_(shard(full_a * bound, self.lora_A))
        if self.use_dora:
            self.lora_magnitude = torch.nn.Parameter(self._weight_norm(w.detach()))
            if self.column:
                set_tensor_model_parallel_attributes(self.lora_magnitude, True, 0, 1)
            else:
                set_defaults_if_not_set_tensor_model_parallel_attributes(self.lora_magnitude)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # e.g. .weight, .bias, .backward_dw()

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: getattr(self, n) for n in ADAPTER_PARAMS if n in self._parameters}

    @torch.no_grad()
    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        """Row norms of the full (unsharded-input) weight; detached, as in HF PEFT."""
        if self.column:
            return torch.linalg.norm(w, dim=1).to(w.dtype)
        sq = w.float().pow(2).sum(dim=1)
        dist.all_reduce(sq, group=self.base_layer.tp_group)
        return sq.sqrt().to(w.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` for this rank's shard of the weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.p_drop or not self.training:
            return x
        if self.column:  # replicated input: the same mask on every TP rank (default generator)
            return F.dropout(x, self.p_drop, True)
        with get_cuda_rng_tracker().fork():  # sharded input: independent masks per TP rank
            return F.dropout(x, self.p_drop, True)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        group = self.base_layer.tp_group
        h = F.linear(x, self.lora_A)
        if self.column:
            h = copy_to_tensor_model_parallel_region(h, group=group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=group)
        # The scale multiplies the rank-r hidden, not the layer-wide output: one pass over
        # tokens x rank instead of tokens x out_features, forward and backward.
        return F.linear(h * self.scaling, self.lora_B)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, out_bias = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out, out_bias
        if args or kwargs.get("weight") is not None:
            raise NotImplementedError("LoraLinear: an externally supplied weight is not supported")
        gather = False
        if self.column:
            gather = kwargs.get("runtime_gather_output")
            gather = self.base_layer.gather_output if gather is None else gather
        xd = self._dropout(x)
        delta = self._lora(xd)
        if self.use_dora:
            w = self.base_layer.weight
            scale = self.lora_magnitude / self._weight_norm(w + self.delta_weight().detach())
            if xd is x:  # the base output without its bias, as HF PEFT does
                bias = self.base_layer.bias
                added = bias is not None and not self.base_layer.skip_bias_add
                plain = out
                if gather:  # this rank's columns of the gathered output (gathered by rank order)
                    group = self.base_layer.tp_group
                    plain = plain.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)]
                plain = plain - bias if added else plain
            else:
                group = self.base_layer.tp_group
                if self.column:  # replicated input, output rows split: all-reduce xd's gradient,
                    # as the base layer does (each rank's part was used alone, and the replicated
                    # parameters before this layer drifted apart across TP ranks)
                    plain = F.linear(copy_to_tensor_model_parallel_region(xd, group=group), w)
                else:
                    plain = reduce_from_tensor_model_parallel_region(F.linear(xd, w), group=group)
            delta = (scale - 1) * plain + scale * delta
        if gather:
            delta = gather_from_tensor_model_parallel_region(delta, group=self.base_layer.tp_group)
        return out + delta, out_bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (``W + s B A``, or DoRA's ``W'``); keeps a copy."""
        if self.merged:
            return
        w = self.base_layer.weight
        self._saved_weight = w.detach().to("cpu", copy=True)  # host copy: no extra device memory
        merged = w + self.delta_weight()
        if self.use_dora:
            merged = (self.lora_magnitude / self._weight_norm(merged))[:, None] * merged
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._saved_weight)
        self._saved_weight, self.merged = None, False

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Base tensors under their usual checkpoint keys, adapters as ``<prefix>lora_*``."""
        inner = f"{prefix}base_layer."
        out = self.base_layer.sharded_state_dict(inner, sharded_offsets, metadata)
        replace_prefix_for_sharding(out, inner, prefix)
        axis = {"lora_B": 0, "lora_magnitude": 0} if self.column else {"lora_A": 1}
        out.update(make_sharded_tensors_for_checkpoint(
            dict(self.adapter_parameters()), prefix, axis, sharded_offsets,
            tp_group=self.base_layer.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        ))
        if self.tp_chunks == 2:  # what MLP.sharded_state_dict does for a GLU fc1's weight and bias
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for key in (f"{inner}weight", f"{inner}bias", f"{prefix}lora_B", f"{prefix}lora_magnitude"):
                if key in out:
                    out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets, singleton)
        return out
