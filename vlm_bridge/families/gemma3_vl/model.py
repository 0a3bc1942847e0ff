"""Gemma 3 VL on Megatron-Core: a TP-sharded SigLIP tower and projector, and a Gemma decoder.

Non-obvious transforms (mirrored from transformers 5.24 ``models/gemma3`` and ``siglip``):

* SigLIP's Conv2d patch embedding has kernel == stride, i.e. a Linear over each patch flattened
  channel-major ``(C, P, P)``; we keep the Conv2d weight shape and apply it as one matmul. The
  learned position table is added as is (896 px only, no interpolation). Blocks are pre-LN with
  biases, full attention within each image, GELU-tanh MLP; a post-layernorm ends the tower.
* The projector average-pools the ``p x p`` patch grid to ``sqrt(mm_tokens_per_image)`` per side,
  applies a Gemma RMSNorm and multiplies by ``mm_input_projection_weight``, stored
  ``[vision_hidden, text_hidden]`` on disk (transposed into a column-parallel Linear here).
* Gemma RMSNorm is ``norm(x.float()) * (1 + w.float())`` cast back: used for the four per-layer
  norms, the q/k norms, the final norm and the projector norm.
* Token embeddings are multiplied by ``sqrt(hidden)`` cast to the weight dtype; image features are
  scattered in after that scaling (unscaled).
* Each decoder layer is ``x + post_attn_norm(attn(input_norm(x)))`` then
  ``x + post_ffw_norm(mlp(pre_ffw_norm(x)))``: Megatron's layer has no post-norms, so
  :class:`GemmaTransformerLayer` adds them around the same submodules.
* Sliding layers and full layers differ in their rotary (base and linear scaling per layer type)
  and their mask (a one-sided window on top of causal-or-same-image); the image-bidirectional
  spans come from the processor's ``token_type_ids`` and ride on the shared structural mask.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from vlm_bridge.attention.mask import AttentionMask
from vlm_bridge.families._common.glu_mlp import gelu_tanh_activation, gelu_tanh_mlp
from vlm_bridge.families._common.modules import per_element_sharded_state_dict, scatter_vision_embeddings
from vlm_bridge.families._common.norms import Fp32RMSNorm
from vlm_bridge.families._common.specs import transformer_layer_spec
from vlm_bridge.families._common.vlm import Embedded, VLMModel
from vlm_bridge.families.gemma3_vl.config import FULL, SLIDING, Gemma3VLSettings


def _skip_init(weight: torch.Tensor) -> None:
    """Weights always come from a checkpoint."""


class GemmaRMSNorm(Fp32RMSNorm):
    """Gemma's RMSNorm: ``norm(x.float()) * (1 + w.float())`` cast back to x's dtype."""

    offset = 1.0

    def __init__(self, config: TransformerConfig | None = None, hidden_size: int = 0,
                 eps: float = 1e-6) -> None:
        super().__init__(config, hidden_size, eps)


class GemmaTransformerLayer(TransformerLayer):
    """Megatron's layer with Gemma's post-attention and post-feed-forward norms."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1,
                 hidden_dropout: float | None = None, pg_collection=None, vp_stage: int | None = None,
                 sliding: bool = False) -> None:
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        eps = config.layernorm_epsilon
        self.post_attention_layernorm = GemmaRMSNorm(config, config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config, config.hidden_size, eps)
        self.rope_kind = SLIDING if sliding else FULL
        self.mlp.rebuild_activation = gelu_tanh_activation

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None, **kwargs):
        rotary = rotary_pos_emb[self.rope_kind] if isinstance(rotary_pos_emb, dict) else rotary_pos_emb
        attn, bias = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                         rotary_pos_emb=rotary)
        if bias is not None:
            attn = attn + bias
        hidden_states = self.post_attention_layernorm(attn, residual=hidden_states)
        mlp, bias = gelu_tanh_mlp(self.mlp, self.pre_mlp_layernorm(hidden_states))
        if bias is not None:
            mlp = mlp + bias
        return self.post_feedforward_layernorm(mlp, residual=hidden_states), None


def gemma_layer_spec(window: int | None) -> ModuleSpec:
    """The shared local layer spec with Gemma norms, and this layer's window and layer type."""
    spec = transformer_layer_spec(qk_norm=True)
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = GemmaRMSNorm
    attention = sub.self_attention.submodules
    attention.q_layernorm = attention.k_layernorm = GemmaRMSNorm
    attention.core_attention = ModuleSpec(module=attention.core_attention, params={"window": window})
    return ModuleSpec(module=GemmaTransformerLayer, params={"sliding": window is not None}, submodules=sub)


class Rotary1D(torch.nn.Module):
    """Rotary angles ``[s, b, 1, head_dim]`` from per-token positions ``[b, s]`` (positions restart
    per packed sample), with HF's linear scaling (positions divided by ``factor``)."""

    def __init__(self, head_dim: int, theta: float, factor: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq / factor, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)  # [b, s, d]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()


class GemmaProjector(MegatronModule):
    """avg-pool to ``mm_tokens_per_image`` -> Gemma RMSNorm -> Linear (column-parallel, gathered)."""

    def __init__(self, config: TransformerConfig, s: Gemma3VLSettings) -> None:
        super().__init__(config=config)
        self.patches_per_side = s.image_size // s.patch_size
        self.kernel = self.patches_per_side // int(s.mm_tokens_per_image**0.5)
        self.norm = GemmaRMSNorm(config, config.hidden_size, s.vision_norm_eps)
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size, s.hidden_size, config=config, init_method=_skip_init, bias=False,
            gather_output=True, tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, patches, vision_hidden]`` -> ``[n * tokens, text_hidden]``."""
        n, _, hidden = x.shape
        grid = x.transpose(1, 2).reshape(n, hidden, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        out, _ = self.linear_fc1(self.norm(pooled))
        return out.reshape(-1, out.shape[-1]).type_as(x)


class SiglipVisionTower(MegatronModule):
    """SigLIP (no head) + the Gemma 3 projector; ``forward(pixel_values [n, C, H, W])``."""

    sharded_state_dict = per_element_sharded_state_dict

    def __init__(self, config: TransformerConfig, s: Gemma3VLSettings) -> None:
        super().__init__(config=config)
        self.s = s
        p = s.patch_size
        self.patch_embed = torch.nn.Conv2d(s.num_channels, config.hidden_size, p, p, bias=True,
                                           dtype=config.params_dtype)
        self.position_embedding = torch.nn.Embedding((s.image_size // p) ** 2, config.hidden_size,
                                                     dtype=config.params_dtype)
        spec = transformer_layer_spec()
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        self.post_layernorm = torch.nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                                 dtype=config.params_dtype)
        self.projector = GemmaProjector(config, s)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embed.weight
        n, c, height, width = pixel_values.shape
        p = self.s.patch_size
        patches = pixel_values.to(w.dtype).reshape(n, c, height // p, p, width // p, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, (height // p) * (width // p), c * p * p)
        x = F.linear(patches, w.reshape(w.shape[0], -1), self.patch_embed.bias)
        x = (x + self.position_embedding.weight[None]).transpose(0, 1)  # [patches, n, hidden]
        mask = AttentionMask(causal=False)
        for layer in self.layers:
            x, _ = layer(x, attention_mask=mask)
        x = self.post_layernorm(x).transpose(0, 1)
        return self.projector(x)


def image_spans(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Span ids ``[b, s]``: each run of image tokens (type 1) its own id, -1 elsewhere (HF's
    ``get_block_sequence_ids_for_mask``)."""
    is_image = token_type_ids == 1
    previous = F.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, torch.cumsum(starts.long(), dim=1) - 1, -1)


class Gemma3VLModel(VLMModel):
    """SigLIP + projector on the first stage, a Gemma 3 decoder, image-bidirectional masks."""

    position_embedding_type = "none"

    def language_layer_spec(self) -> TransformerBlockSubmodules:
        s, config = self.s, self.config
        windows = [s.sliding_window if kind == SLIDING else None for kind in s.layer_types]
        # This pipeline stage's layers only, as Megatron's own decoder block specs do.
        offset = get_transformer_layer_offset(config)
        count = get_num_layers_to_build(config)
        specs = [gemma_layer_spec(w) for w in windows[offset:offset + count]]
        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=GemmaRMSNorm)

    def build_language_model(self, config: TransformerConfig):
        lm = super().build_language_model(config)
        self.rotaries = torch.nn.ModuleDict({
            kind: Rotary1D(config.kv_channels, base, factor) for kind, (base, factor) in self.s.rope.items()
        })
        return lm

    def build_vision(self, config: TransformerConfig) -> SiglipVisionTower:
        return SiglipVisionTower(config, self.s)

    def rotary(self, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {kind: rotary(position_ids) for kind, rotary in self.rotaries.items()}

    def structure_mask(self, attention_mask, inputs: dict):
        """Image soft tokens attend to their whole image both ways (HF: causal OR same block)."""
        token_types = inputs.get("token_type_ids")
        if token_types is None or not isinstance(attention_mask, AttentionMask):
            return attention_mask  # text only, or decode steps: plain (sliding) causal
        return dataclasses.replace(attention_mask, span_ids=image_spans(token_types), _cache={})

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> Embedded:
        emb = self.embed_text(input_ids)
        emb = emb * torch.tensor(self.s.hidden_size**0.5, dtype=emb.dtype)
        if pixel_values is not None:
            n = pixel_values.shape[0]
            # [n * mm_tokens_per_image, hidden] out: each image is one item of equal cost.
            feats = self.encode_vision(self.vision, [(pixel_values, [1] * n)],
                                       [self.s.mm_tokens_per_image] * n, [1] * n, (self.s.hidden_size,))
            emb = scatter_vision_embeddings(emb, input_ids, self.s.image_token_id, feats, "images")
        return Embedded(emb)
