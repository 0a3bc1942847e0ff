"""Nemotron VL on Megatron-Core: RADIO + projector on the first stage, a hybrid Nemotron-H decoder.

The decoder is Megatron's block with one layer spec per layer (this pipeline stage's share of
``layers_block_type``), all without Transformer Engine:

* ``M``: :class:`MambaLayer` = ``x + mixer(norm(x))`` with the shared Mamba-2 mixer; packed samples
  and padding come from the structural mask's segment ids (state and conv reset per sample);
* ``*``: Megatron's ``TransformerLayer`` with attention only (no MLP), no positional encoding;
* ``-``: ``TransformerLayer`` with the MLP only (squared ReLU, no gate);
* ``E``: ``TransformerLayer`` with Megatron's MoE layer only (router, squared-ReLU experts as
  grouped GEMMs, one shared expert).

Every norm is Nemotron-H's RMSNorm (weight multiply in fp32). Layers differ in their parameters,
so checkpoints key each layer separately (``hetereogenous_dist_checkpoint`` in the config).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from vlm_bridge.families._common.mamba import MambaMixer, MambaSettings
from vlm_bridge.families._common.modules import scatter_vision_embeddings
from vlm_bridge.families._common.norms import Fp32RMSNorm
from vlm_bridge.families._common.specs import transformer_layer_spec
from vlm_bridge.families._common.ssd_scan import conv_fixups, segment_runs
from vlm_bridge.families._common.vlm import Embedded, VLMModel
from vlm_bridge.families.nemotron_vl.config import ATTENTION, MAMBA, MLP, MOE
from vlm_bridge.families.nemotron_vl.radio import RadioVisionTower
from vlm_bridge.parallel import host_to_device, on_host


class MambaLayer(MegatronModule):
    """``x + mixer(norm(x))``; called like a ``TransformerLayer`` by the shared decoder run."""

    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int = 1,
                 pg_collection=None, vp_stage: int | None = None,
                 settings: MambaSettings | None = None) -> None:
        super().__init__(config=config)
        # Global 1-based number, as TransformerLayer computes it (checkpoint keys use it).
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage)
        self.norm = Fp32RMSNorm(config, config.hidden_size, config.layernorm_epsilon)
        self.mixer = MambaMixer(config, settings, layer_number=self.layer_number)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        state = getattr(attention_mask, "state", None)
        if state is not None:
            return self._generate(hidden_states, attention_mask, state), None
        runs = fixups = None
        ids = getattr(attention_mask, "segment_ids", None)
        if ids is not None:  # one derivation per forward, on the host (no wait for the GPU)
            runs = attention_mask.cached("mamba_runs",
                                         lambda: host_to_device(segment_runs(on_host(ids)), ids.device))
            taps = self.mixer.settings.d_conv

            def derive_fixups():
                fixups = conv_fixups(on_host(runs), taps)
                return fixups.to(ids.device) if fixups is not None else None

            fixups = attention_mask.cached(("mamba_conv_fixups", taps), derive_fixups)
        out, _ = self.mixer(self.norm(hidden_states), runs=runs, fixups=fixups)
        return hidden_states + out, None

    def _generate(self, hidden_states: torch.Tensor, attention_mask, state) -> torch.Tensor:
        """Prefill keeps the conv inputs and SSM state of each row's last sample; each decoding
        step continues from them one token at a time."""
        key = ("mamba", self.layer_number)
        if state.prefilling:
            out, conv, ssm = self.mixer.prefill(self.norm(hidden_states), attention_mask.segment_ids)
            state.pieces[key] = (conv, ssm)
            return hidden_states + out
        if hidden_states.shape[0] != 1:
            raise ValueError("Mamba layers decode one token per step")
        conv_state, ssm_state = state.pieces[key]
        out, conv, ssm = self.mixer.step(self.norm(hidden_states), conv_state, ssm_state)
        # In place: the same tensors serve every step (and a captured CUDA graph).
        conv_state.copy_(conv)
        ssm_state.copy_(ssm)
        return hidden_states + out


def _one_sublayer(attention: bool, num_experts: int | None = None) -> ModuleSpec:
    """Megatron's layer with only its attention (``*``) or only its MLP (``-``) or MoE (``E``),
    the other half an identity, each behind a Nemotron-H RMSNorm."""
    spec = transformer_layer_spec(num_experts=num_experts)
    sub = copy.copy(spec.submodules)
    if attention:
        sub.input_layernorm = Fp32RMSNorm
        sub.pre_mlp_layernorm, sub.mlp, sub.mlp_bda = IdentityOp, IdentityOp, IdentityFuncOp
    else:
        sub.pre_mlp_layernorm = Fp32RMSNorm
        sub.input_layernorm, sub.self_attention, sub.self_attn_bda = IdentityOp, IdentityOp, IdentityFuncOp
    return ModuleSpec(module=spec.module, submodules=sub)


def layer_spec(kind: str, mamba: MambaSettings, num_experts: int | None = None) -> ModuleSpec:
    if kind == MAMBA:
        return ModuleSpec(module=MambaLayer, params={"settings": mamba})
    if kind == ATTENTION:
        return _one_sublayer(attention=True)
    if kind == MLP:
        return _one_sublayer(attention=False)
    if kind == MOE:
        return _one_sublayer(attention=False, num_experts=num_experts)
    raise ValueError(f"Nemotron-H layer type {kind!r} is not supported")


class NemotronVLModel(VLMModel):
    """RADIO + projector on the first stage, a hybrid Mamba-2 / attention / MLP decoder."""

    position_embedding_type = "none"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, TopKRouter):
                # The expert bias routes but is never trained (HF never updates it; the update rate
                # is 0): its token counting is off, which in Megatron 0.16 also fails on a padding
                # mask (a [tokens] mask against the [tokens, experts] routing map).
                module.enable_expert_bias = False

    def language_layer_spec(self) -> TransformerBlockSubmodules:
        s, config = self.s, self.config
        # This pipeline stage's layers only, as Megatron's own decoder block specs do.
        offset, count = get_transformer_layer_offset(config), get_num_layers_to_build(config)
        specs = [layer_spec(kind, s.mamba, config.num_moe_experts)
                 for kind in s.layer_types[offset:offset + count]]
        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=Fp32RMSNorm)

    def build_vision(self, config: TransformerConfig) -> RadioVisionTower:
        return RadioVisionTower(config, self.s)

    def rotary(self, position_ids: torch.Tensor) -> None:
        return None  # Nemotron-H attention has no positional encoding

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_hw: torch.Tensor | None = None,
              pixel_values_videos: torch.Tensor | None = None) -> Embedded:
        emb = self.embed_text(input_ids)
        if pixel_values is not None and pixel_values_videos is not None:
            # Both fill the one image placeholder token, so their order along the sequence is not
            # recoverable from the inputs (transformers refuses this batch as well).
            raise ValueError("Nemotron VL: one batch with both images and video is not supported; "
                             "keep image and video samples in separate batches (no packing across them)")
        f = self.s.downsample
        if pixel_values is not None and image_grid_hw is not None:
            # Images as items (each its patches and its grid row), as encode_vision takes them.
            hw = on_host(image_grid_hw).tolist()
            patches = [r * c for r, c in hw]
            feats = self.encode_vision(self.vision, [(pixel_values, patches), (image_grid_hw, [1] * len(hw))],
                                       [(r // f) * (c // f) for r, c in hw], patches, (self.s.hidden_size,))
        elif isinstance(pixel_values_videos, torch.Tensor):
            # Videos of one frame size ``[videos, tubelets, T*C, H, W]``, each video an item.
            videos, tubelets, _, height, width = pixel_values_videos.shape
            p = self.s.patch_size
            tokens = tubelets * (height // p // f) * (width // p // f)
            feats = self.encode_vision(self.vision.encode_videos, [(pixel_values_videos, [1] * videos)],
                                       [tokens] * videos, [tokens] * videos, (self.s.hidden_size,))
        elif pixel_values is not None or pixel_values_videos is not None:
            feats = self.vision(pixel_values, image_grid_hw, pixel_values_videos)
        if pixel_values is not None or pixel_values_videos is not None:
            # Images and video frames share the image placeholder token, as in HF.
            emb = scatter_vision_embeddings(emb, input_ids, self.s.image_token_id, feats, "images/video")
        return Embedded(emb)
