"""What every family's VLM wrapper shares: the GPTModel language model with MRoPE, the hooks
Megatron's schedules look for, and the loss over an unpadded vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.vocab import mask_padded_vocab, padded_vocab_size


class VLMBase(MegatronModule):
    """Vision tower (first pipeline stage only; set by the subclass) + Megatron GPTModel."""

    def __init__(self, language_config: TransformerConfig, layer_spec: ModuleSpec, s,
                 pre_process: bool, post_process: bool) -> None:
        super().__init__(config=language_config)
        self.s = s
        self.pre_process, self.post_process = pre_process, post_process
        self.language_model = GPTModel(
            config=language_config,
            transformer_layer_spec=layer_spec,
            vocab_size=s.padded_vocab_size,
            max_sequence_length=s.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=s.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=s.rope_theta,
        )
        # Megatron's schedules and optimizer look these up on the outermost module.
        self.share_embeddings_and_output_weights = s.tie_word_embeddings
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def run_language_model(self, decoder_input, position_ids, attention_mask, labels,
                           runtime_gather_output) -> torch.Tensor:
        """Logits ``[b, s, vocab]``, or the per-token loss when ``labels`` is given.

        Megatron's built-in loss would count the padded vocabulary rows (logit 0, not -inf), so
        with a padded vocabulary the loss is computed here after masking them.
        """
        padded = self.post_process and self.s.padded_vocab_size > self.s.vocab_size
        out = self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
            decoder_input=decoder_input, labels=None if padded else labels,
            runtime_gather_output=runtime_gather_output and labels is None,
        )
        if not (padded and labels is not None):
            return out
        logits = mask_padded_vocab(out, self.s.vocab_size)
        loss = vocab_parallel_cross_entropy(
            logits.transpose(0, 1).float().contiguous(), labels.transpose(0, 1).contiguous()
        )
        return loss.transpose(0, 1)


@dataclass
class QwenVLSettings:
    """Fields both Qwen VLM families need beyond their TransformerConfigs."""

    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    mrope_section: list[int]
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    vision_rope_theta: float
    out_hidden_size: int


def qwen_vl_settings(hf_config, language: TransformerConfig, tp: int, default_rope_theta: float) -> dict:
    """Keyword arguments for the :class:`QwenVLSettings` fields, read from the HF config."""
    text, vision = hf_config.text_config, hf_config.vision_config
    rope = dict(text.rope_parameters or {})
    return dict(
        vocab_size=text.vocab_size,
        padded_vocab_size=padded_vocab_size(text.vocab_size, tp),
        max_position_embeddings=text.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", default_rope_theta)),
        mrope_section=list(language.mrope_section),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        in_channels=vision.in_channels,
        spatial_merge_size=vision.spatial_merge_size,
        vision_rope_theta=float((vision.rope_parameters or {}).get("rope_theta", 10000.0)),
        out_hidden_size=vision.out_hidden_size,
    )


def check_divisibility(hf_config, tp: int, pp: int) -> None:
    """One-line errors for layouts a Qwen-style VLM cannot be split into (before Megatron asserts)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    checks = [
        ("language attention heads", text.num_attention_heads, tp, "--tp"),
        ("language key/value heads", text.num_key_value_heads, tp, "--tp"),
        ("language FFN size", text.intermediate_size, tp, "--tp"),
        ("vision attention heads", vision.num_heads, tp, "--tp"),
        ("vision FFN size", vision.intermediate_size, tp, "--tp"),
        ("merger width", vision.hidden_size * vision.spatial_merge_size**2, tp, "--tp"),
        ("language layers", text.num_hidden_layers, pp, "--pp"),
    ]
    for what, size, parts, flag in checks:
        if size % parts:
            raise ValueError(f"{flag} {parts} does not divide the {what} ({size})")
