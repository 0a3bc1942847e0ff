"""Torch-native core attention for Megatron-Core layer specs (no Transformer Engine, no flash-attn).

Megatron-Core's ``SelfAttention`` hands its core-attention submodule ``query/key/value`` shaped
``[s, b, heads, head_dim]`` (keys and values with the per-partition query-group count) and expects
``[s, b, heads * head_dim]`` back. This module computes it with ``scaled_dot_product_attention``.

The ``attention_mask`` Megatron passes through its layers untouched is, for our models, an
:class:`~vlm_bridge.attention.mask.AttentionMask` describing the mask *structurally* (segments,
padding, causal, bidirectional spans, sliding window, query offset). That keeps one object valid
for every layer, and the backend is chosen per mask:

* plain causal / full attention over whole rows: SDPA with no mask (its fused kernels);
* one packed row of causal segments on CUDA in half precision: varlen flash attention over
  ``cu_seqlens`` (no mask tensor);
* spans or sliding windows on CUDA: FlexAttention with a block mask from the same predicate
  (blocks outside the window or segment are skipped, never an S x S tensor);
* anything else (and everything on CPU): SDPA with a dense boolean mask built once per forward.

``VLM_BRIDGE_ATTENTION=flex|dense`` forces a backend (tests compare them). A layer with a sliding
window (``window`` in its spec params) applies it on top of the shared mask. A raw boolean tensor
in Megatron's convention (True = masked out) is accepted too.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention.bias import causal_lower_right

from vlm_bridge.attention.mask import AttentionMask
from vlm_bridge.compat.dynamo import allow_recompiles

# _sdpa_mask's answer for a block of queries that are the last keys under a plain causal mask.
LOWER_RIGHT = object()

__all__ = ["AttentionMask", "TorchCoreAttention"]


def _varlen_fn():
    """torch's flash-attention varlen entry point, with its keyword set, when this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_ARGS = _varlen_fn()
_COMPILED_FLEX = None


def _flex_attention(cuda: bool):
    """FlexAttention, compiled into a fused kernel on the GPU (eager it materialises the scores)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if _COMPILED_FLEX is None:
        # One kernel per (rows, heads, length): packed micro-batches end at a multiple of
        # data.row_multiple, so a run meets several lengths (more than dynamo's default 8 variants).
        allow_recompiles()
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class TorchCoreAttention(MegatronModule):
    """Drop-in for Megatron-Core's ``DotProductAttention`` built on SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        window: int | None = None,
    ) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state

        tp = (
            pg_collection.tp.size()
            if pg_collection is not None
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(
            self.head_dim
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = window  # this layer's sliding window (local layers), None for global
        self.layer_number = layer_number  # keys this layer's piece of a decoding state

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: AttentionMask | torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("pass packing as AttentionMask.segment_ids, not THD params")
        sq, b = query.shape[0], query.shape[1]
        if isinstance(attention_mask, AttentionMask) and self.window is not None:
            attention_mask = attention_mask.with_window(self.window)
        state = attention_mask.state if isinstance(attention_mask, AttentionMask) else None
        if state is not None:  # generation: attend over every cached position plus the new ones
            key, value = state.kv_cache(self.layer_number).extend(key, value, state)
            static = state.static_mask(self.window)
            if static is not None:  # CUDA-graph decoding: fixed shapes, the mask says what counts
                return self._sdpa(query, key, value, static, False, slice_window=False)
        split = attention_mask.context if isinstance(attention_mask, AttentionMask) else None
        if split is not None:
            return self._context_parallel(query, key, value, attention_mask, split)
        if self._use_varlen(query, attention_mask, key):
            return self._varlen(query, key, value, attention_mask)
        if self._use_flex(query, attention_mask, key.shape[0]):
            # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = self._flex(q, k, v, attention_mask)
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)
        mask, is_causal = self._sdpa_mask(attention_mask, attn_mask_type, sq, key.shape[0], query.device)
        offset = None
        if isinstance(attention_mask, AttentionMask):
            offset = attention_mask.offset(sq, key.shape[0])
        return self._sdpa(query, key, value, mask, is_causal, offset=offset)

    def _context_parallel(self, query, key, value, mask: AttentionMask, split) -> torch.Tensor:
        """This rank's two query chunks against the gathered keys (see attention/context.py).

        Under a causal mask without image spans a chunk sees no key after its own end, so only the
        keys up to there are used (queries are then the last keys: lower-right causal).
        """
        width = key.shape[-1]  # one all-gather for keys and values together
        key, value = split.gather(torch.cat([key, value], dim=-1), 0).split([width, value.shape[-1]], dim=-1)
        outs = []
        for (start, end), q in zip(split.chunks(), query.chunk(2, dim=0)):
            block = mask.for_queries(start)
            if block.causal and block.span_ids is None:
                outs.append(self.forward(q, key[:end], value[:end], block))
            else:
                outs.append(self.forward(q, key, value, block))
        return torch.cat(outs, dim=0)

    def _sdpa(self, query, key, value, mask, is_causal: bool, slice_window: bool = True,
              offset: int | None = None) -> torch.Tensor:
        """SDPA over ``[s, b, heads, d]`` inputs; ``offset`` is the global position of the first
        query among the keys (default: the queries are the last keys)."""
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if slice_window:
            k, v, mask = self._window_keys(k, v, mask, k.shape[2] - sq if offset is None else offset)
        if mask is LOWER_RIGHT:
            mask = causal_lower_right(q.shape[2], k.shape[2])
            if k.shape[1] != q.shape[1]:  # its kernels take no GQA flag: one K/V head per query head
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)

    def _window_keys(self, k, v, mask, offset: int):
        """A sliding-window layer whose queries start at key ``offset`` (decoding, a
        context-parallel chunk): keys before the window of the first query are masked for every
        query, so they are left out and a step costs the window, not the sequence."""
        first = offset - self.window + 1 if self.window is not None else 0
        if first <= 0 or not isinstance(mask, torch.Tensor):
            return k, v, mask
        return k[:, :, first:], v[:, :, first:], mask[..., first:]

    def _use_flex(self, query: torch.Tensor, mask, sk: int) -> bool:
        forced = os.environ.get("VLM_BRIDGE_ATTENTION")
        if not isinstance(mask, AttentionMask) or forced == "dense" or mask.is_plain():
            return False
        if mask.state is not None:  # decoding against a cache: a few query rows, a dense mask is small
            return False
        if self.training and self.dropout_p > 0:  # FlexAttention has no attention dropout
            return False
        if forced == "flex":
            return True
        return query.is_cuda and (mask.span_ids is not None or mask.window is not None)

    def _flex(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        flex_attention = _flex_attention(q.is_cuda)
        block = mask.block_mask(q.shape[2], k.shape[2], q.device, q.shape[1])
        with warnings.catch_warnings():
            # On the CPU FlexAttention runs unfused (tests only); it says so on every call.
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block,
                                  scale=self.softmax_scale,
                                  enable_gqa=self.groups_per_partition != self.heads_per_partition)

    def _use_varlen(self, query: torch.Tensor, mask, key: torch.Tensor | None = None) -> bool:
        return (
            _VARLEN is not None and query.is_cuda and query.shape[1] == 1
            and (key is None or key.shape[0] == query.shape[0])
            and query.dtype in (torch.float16, torch.bfloat16)
            and isinstance(mask, AttentionMask) and mask.cu_seqlens(query.device) is not None
        )

    def _varlen(self, query, key, value, mask: AttentionMask) -> torch.Tensor:
        """Packed segments on the GPU: flash-attention over ``cu_seqlens``, no mask tensor."""
        cu, max_len = mask.cu_seqlens(query.device)
        q, k, v = query[:, 0], key[:, 0], value[:, 0]  # [s, heads, d]
        kwargs = {"scale": self.softmax_scale}
        if self.groups_per_partition != self.heads_per_partition:
            if "enable_gqa" in _VARLEN_ARGS:
                kwargs["enable_gqa"] = True
            else:
                rep = self.heads_per_partition // self.groups_per_partition
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask.causal:
            if "is_causal" in _VARLEN_ARGS:
                kwargs["is_causal"] = True
            else:
                kwargs["window_size"] = (-1, 0)
        out = _VARLEN(q, k, v, cu, cu, max_len, max_len, **kwargs)
        return out.reshape(q.shape[0], 1, self.heads_per_partition * self.head_dim)

    def _sdpa_mask(self, attention_mask, attn_mask_type, sq, sk, device):
        if isinstance(attention_mask, AttentionMask):
            # SDPA's is_causal aligns queries to the first keys; with an offset the mask says where.
            aligned = attention_mask.offset(sq, sk) == 0
            if attention_mask.is_plain() and (aligned or not attention_mask.causal):
                return None, attention_mask.causal and sq > 1
            if attention_mask.is_plain() and sq == 1:  # one new token sees every key
                return None, False
            if attention_mask.is_plain() and attention_mask.offset(sq, sk) == sk - sq:
                return LOWER_RIGHT, False  # the last sq keys' causal block: no mask tensor
            return attention_mask.dense(sq, sk, device), False
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            return None, mask_type == AttnMaskType.causal and sq > 1
        # Megatron convention: True means "masked out".
        return ~attention_mask.bool(), False
