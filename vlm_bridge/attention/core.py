"""Torch-native core attention for Megatron-Core layer specs (no Transformer Engine, no flash-attn).

Megatron-Core's ``SelfAttention`` hands its core-attention submodule ``query/key/value`` shaped
``[s, b, heads, head_dim]`` (keys and values with the per-partition query-group count) and expects
``[s, b, heads * head_dim]`` back. This module computes it with ``scaled_dot_product_attention``.

The ``attention_mask`` Megatron passes through its layers untouched is, for our models, an
:class:`AttentionMask` describing the mask *structurally* (causal or not, which tokens belong to
which segment, which tokens are padding). That keeps one object valid for every layer and lets each
backend build what it needs: a dense boolean mask for SDPA on CPU, or nothing at all for plain
causal/full attention (SDPA then picks its fused kernels). A raw boolean tensor in Megatron's
convention (True = masked out) is accepted too.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


@dataclass
class AttentionMask:
    """Structural attention mask shared by all layers of one forward pass.

    segment_ids: ``[b, s]`` int; tokens attend only within their own segment (a packed document, an
        image, or a ViT window). Negative ids mark padding, which attends to nothing but itself.
        ``None`` means one segment per row and no padding.
    causal: whether a token may attend to later tokens of its segment.
    """

    segment_ids: torch.Tensor | None = None
    causal: bool = True
    # Built once per forward and reused by every layer (a ViT has 32 of them).
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, causal: bool) -> AttentionMask:
        """Block-diagonal mask for one packed row whose segments end at ``cu_seqlens[1:]``."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        return cls(segment_ids=ids[None], causal=causal)

    @classmethod
    def from_padding(cls, attention_mask: torch.Tensor | None) -> AttentionMask:
        """Causal mask for a padded batch (HF ``attention_mask``: 1 = token, 0 = padding)."""
        if attention_mask is None or bool(attention_mask.all()):
            return cls(segment_ids=None, causal=True)
        return cls(segment_ids=torch.where(attention_mask.bool(), 0, -1), causal=True)

    def dense(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        """Boolean ``[b|1, 1, sq, sk]`` mask, True where attention is allowed (SDPA convention)."""
        key = ("dense", sq, sk, str(device))
        if key not in self._cache:
            self._cache[key] = self._build_dense(sq, sk, device)
        return self._cache[key]

    def cu_seqlens(self, device: torch.device) -> tuple[torch.Tensor, int] | None:
        """``(cu_seqlens int32, max_len)`` when this is one row of contiguous segments, else None.

        Padding (id -1) forms segments of its own, which is harmless: padded positions never
        carry loss and nothing real attends to them.
        """
        key = ("cu", str(device))
        if key not in self._cache:
            self._cache[key] = None
            ids = self.segment_ids
            if ids is not None and ids.shape[0] == 1:
                ids = ids[0]
                change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
                bounds = torch.cat([change.new_zeros(1), change, change.new_tensor([ids.numel()])])
                starts = ids[bounds[:-1]]
                real = starts[starts >= 0]
                if real.unique().numel() == real.numel():  # every segment is one contiguous run
                    lengths = bounds[1:] - bounds[:-1]
                    self._cache[key] = (bounds.to(device, torch.int32), int(lengths.max()))
        return self._cache[key]

    def _build_dense(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        allowed = None
        if self.segment_ids is not None:
            ids = self.segment_ids.to(device)
            allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
            # Padding queries attend to themselves so that softmax never sees an all-masked row.
            eye = torch.eye(sq, sk, dtype=torch.bool, device=device)
            allowed = allowed | (eye[None] & (ids[:, :, None] < 0))
        if self.causal:
            causal = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
            allowed = causal[None] if allowed is None else allowed & causal[None]
        return None if allowed is None else allowed[:, None]

    def needs_dense(self) -> bool:
        return self.segment_ids is not None


def _varlen_fn():
    """torch's flash-attention varlen entry point, with its keyword set, when this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_ARGS = _varlen_fn()


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
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("TorchCoreAttention does not implement context parallelism yet")
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
        if self._use_varlen(query, attention_mask):
            return self._varlen(query, key, value, attention_mask)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, is_causal = self._sdpa_mask(attention_mask, attn_mask_type, sq, k.shape[2], q.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=self.groups_per_partition != self.heads_per_partition,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)

    def _use_varlen(self, query: torch.Tensor, mask) -> bool:
        return (
            _VARLEN is not None and query.is_cuda and query.shape[1] == 1
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
            if not attention_mask.needs_dense():
                return None, attention_mask.causal and sq > 1
            return attention_mask.dense(sq, sk, device), False
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            return None, mask_type == AttnMaskType.causal and sq > 1
        # Megatron convention: True means "masked out".
        return ~attention_mask.bool(), False
