"""The one VLM forward every family shares: it owns the run of the language model.

A family subclasses :class:`VLMModel` and provides

* ``language_layer_spec()`` (and, if its stack is not a GPT decoder, ``build_language_model``),
* ``build_vision(vision_config)`` for the first pipeline stage,
* ``embed(input_ids, **media)`` -> :class:`Embedded`: text embeddings with its vision features merged
  in, plus any additions to the hidden states after given decoder layers (DeepStack), passed to
  the decoder run as explicit inputs rather than forward hooks,
* optionally ``rotary(position_ids)`` when its positions are not Megatron's MRoPE.

This class runs embedding -> decoder layers (+ additions) -> final norm -> output layer -> loss,
and is the single place where inference state and sequence slicing for context parallelism plug
in. Parameter names stay Megatron's ``GPTModel`` ones (``language_model.embedding...``,
``language_model.decoder.layers.N...``, ``language_model.output_layer``), so checkpoints load at any
layout with Megatron's own sharded state dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor

from vlm_bridge.attention.context import (
    UNSPLIT,
    context_parallel_size,
    current_split,
    pad_tokens,
    padded_length,
)
from vlm_bridge.families._common import fused_cross_entropy
from vlm_bridge.families._common.chunked_loss import chunked_linear_cross_entropy, chunking_pays
from vlm_bridge.families._common.fused import fusion_enabled
from vlm_bridge.families._common.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from vlm_bridge.families._common.linears import (
    FusedBiasColumnParallelLinear,
    accumulate_weight_gradient_in_gemm,
)
from vlm_bridge.families._common.vision_split import encode_split
from vlm_bridge.families._common.vocab import mask_padded_vocab


@dataclass
class Embedded:
    """What ``embed`` hands the decoder: ``[s, b, h]`` inputs and per-layer additions.

    ``layer_additions[i]`` (``[s, b, h]``) is added to the output of global decoder layer ``i``.
    """

    decoder_input: torch.Tensor
    layer_additions: dict[int, torch.Tensor] = field(default_factory=dict)


class VLMModel(MegatronModule):
    """Vision tower (first pipeline stage) + a Megatron language model, one forward for all families.

    ``s`` is the family's settings object; it must carry ``vocab_size``, ``padded_vocab_size``,
    ``max_position_embeddings``, ``tie_word_embeddings`` and ``rope_theta``.
    """

    # Megatron GPTModel position embedding this family's language model uses.
    position_embedding_type = "mrope"

    def __init__(self, language_config: TransformerConfig, vision_config: TransformerConfig, s,
                 pre_process: bool = True, post_process: bool = True) -> None:
        super().__init__(config=language_config)
        self.s = s
        self.pre_process, self.post_process = pre_process, post_process
        self.language_model = self.build_language_model(language_config)
        self.vision = self.build_vision(vision_config) if pre_process else None
        # Megatron's schedules and optimizer look these up on the outermost module.
        self.share_embeddings_and_output_weights = s.tie_word_embeddings
        self.model_type = ModelType.encoder_or_decoder

    # ---- what a family provides -------------------------------------------------------------
    def language_layer_spec(self) -> ModuleSpec:
        raise NotImplementedError

    def build_language_model(self, config: TransformerConfig) -> MegatronModule:
        s = self.s
        lm = GPTModel(
            config=config, transformer_layer_spec=self.language_layer_spec(),
            vocab_size=s.padded_vocab_size, max_sequence_length=s.max_position_embeddings,
            pre_process=self.pre_process, post_process=self.post_process,
            share_embeddings_and_output_weights=s.tie_word_embeddings,
            position_embedding_type=self.position_embedding_type, rotary_base=s.rope_theta,
        )
        if self.post_process and not s.tie_word_embeddings:
            accumulate_weight_gradient_in_gemm(lm.output_layer)
        return lm

    def build_vision(self, config: TransformerConfig) -> torch.nn.Module:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, **media) -> Embedded:
        raise NotImplementedError

    def structure_mask(self, attention_mask, inputs: dict):
        """The family's additions to the structural mask from its per-token inputs (e.g. spans of
        image tokens that attend bidirectionally); unchanged by default."""
        return attention_mask

    def rotary(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotary angles for every decoder layer (Megatron's multimodal rotary by default); a
        family whose layers differ may return a dict its layers pick from."""
        lm = self.language_model
        # Positions arrive already split over context-parallel ranks: Megatron must not split again.
        return lm.rotary_pos_emb(position_ids, lm.mrope_section, cp_group=UNSPLIT)

    def encode_vision(self, encode, inputs, out_rows, cost, out_shape: tuple[int, ...], outputs: int = 1):
        """``encode(*tensors)`` over the batch's media items; with context parallelism each CP rank
        encodes a share of the items and the features are gathered (``vision_split.encode_split``
        describes the arguments)."""
        ahead = getattr(self, "_encoded_ahead", None)
        if ahead is not None:  # the step's media are encoded in one pass (train/vision_ahead.py)
            return ahead(encode, inputs, out_rows, out_shape, outputs, self.config.params_dtype)
        split = getattr(self, "_vision_split", None)
        if split is None:
            return encode(*(tensor for tensor, _ in inputs))
        return encode_split(encode, inputs, out_rows, cost, split, out_shape, self.config.params_dtype,
                            outputs)

    def media_inputs(self, inputs: dict) -> dict:
        """What :meth:`forward` hands :meth:`embed` besides the token ids, from its inputs: all
        but forward's own named arguments."""
        named = _named_arguments(VLMModel.forward)
        return {k: v for k, v in inputs.items() if k not in named}

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[s, b, h]`` token embeddings (the family merges vision features into these)."""
        return self.language_model.embedding(input_ids=input_ids, position_ids=None)

    # ---- Megatron pipeline hooks -------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # ---- the run ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask,
                labels: torch.Tensor | None = None, runtime_gather_output: bool | None = None,
                last_only: bool = False, **media) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` (or per-token loss ``[b, s]`` with ``labels``) on the last
        stage; the hidden states ``[s, b, h]`` on the others. ``last_only``: logits of the last
        position only (``[b, 1, vocab]``), what generation samples from."""
        attention_mask = self.structure_mask(attention_mask, media)
        length = input_ids.shape[1]
        split = self._context_split(length, attention_mask, last_only)
        if split is not None:  # this rank's two chunks of the (padded) sequence
            attention_mask = _mask_for_split(attention_mask, input_ids, split)
            position_ids = split.take(pad_tokens(position_ids, split.length, -1, 0), dim=-1)
            if labels is not None:
                labels = split.take(pad_tokens(labels, split.length, 1, 0), dim=1)
        self._vision_split = split  # what encode_vision deals the batch's images and videos over
        embedded = self.embed(input_ids, **media) if self.pre_process else None
        self._vision_split = None
        if split is not None and embedded is not None:
            def local(t):
                return split.take(pad_tokens(t, split.length, 0, 0), dim=0)

            embedded = Embedded(local(embedded.decoder_input),
                                {i: local(t) for i, t in embedded.layer_additions.items()})
        hidden = self.run_decoder(embedded, position_ids, attention_mask)
        if not self.post_process:
            return hidden.contiguous()  # sent to the next stage as is
        if last_only:
            hidden = hidden[-1:]
        out = self.output(hidden, labels, runtime_gather_output)
        if split is not None and labels is None:  # logits of the whole sequence, in order
            out = split.gather(out, dim=1)[:, :length]
        return out

    def _context_split(self, length: int, attention_mask, last_only: bool):
        cp = context_parallel_size()
        if cp == 1:
            return None
        if last_only or getattr(attention_mask, "state", None) is not None:
            raise ValueError("generation does not run with context parallelism (cp > 1)")
        return current_split(padded_length(length, cp))

    def run_decoder(self, embedded: Embedded | None, position_ids, attention_mask) -> torch.Tensor:
        """Decoder layers with the family's additions after the layers it names, then final norm."""
        decoder = self.language_model.decoder
        hidden = embedded.decoder_input if embedded is not None else decoder.input_tensor
        additions = embedded.layer_additions if embedded is not None else {}
        # Pipeline stages exchange this tensor; Megatron needs it to own its storage.
        hidden = make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True)
        rotary = self.rotary(position_ids)
        # MoE routing (and its load-balancing loss) leaves padding out, so packed and padded
        # batches route the same real tokens.
        padding = getattr(attention_mask, "segment_ids", None)
        padding = padding < 0 if padding is not None else None
        if padding is not None and attention_mask.context is not None:
            padding = attention_mask.context.take(padding, dim=1)
        for layer in decoder.layers:
            hidden, _ = layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary,
                              padding_mask=padding)
            extra = additions.get(layer.layer_number - 1)
            if extra is not None:
                hidden = hidden + extra.to(hidden.dtype)
        if decoder.final_layernorm is not None:
            hidden = make_viewless_tensor(inp=decoder.final_layernorm(hidden), requires_grad=True,
                                          keep_graph=True)
        elif not self.pre_process and len(decoder.layers) == 0:
            hidden = hidden.clone()
        return hidden

    def output(self, hidden: torch.Tensor, labels: torch.Tensor | None,
               runtime_gather_output: bool | None) -> torch.Tensor:
        """Output layer, then logits ``[b, s, vocab]`` or the per-token loss ``[b, s]``.

        Padded vocabulary rows (logit 0, not -inf) are masked before the loss, so the loss equals
        HF's over the real vocabulary.
        """
        lm = self.language_model
        weight = lm.shared_embedding_or_output_weight() if self.s.tie_word_embeddings else None
        if labels is not None and _chunked_loss_applies(lm, labels.numel()):
            loss = chunked_linear_cross_entropy(hidden, lm.output_layer.weight if weight is None else weight,
                                                labels.transpose(0, 1), self.s.vocab_size)
            return loss.transpose(0, 1).contiguous()
        gather = runtime_gather_output and labels is None
        logits, _ = lm.output_layer(hidden, weight=weight, runtime_gather_output=gather)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        if fusion_enabled(logits) and fused_cross_entropy.available(logits):
            # The logits exist for this loss alone: their gradient may take their place.
            loss = fused_vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.s.vocab_size,
                                                      grad_in_place=True)
            return loss.transpose(0, 1).contiguous()
        if self.s.padded_vocab_size > self.s.vocab_size:
            # The loss works in fp32 anyway: mask that copy in place rather than make another.
            logits = mask_padded_vocab(logits.float(), self.s.vocab_size, inplace=True)
            loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
            return loss.transpose(0, 1).contiguous()
        return lm.compute_language_model_loss(labels, logits)


@functools.cache
def _named_arguments(function) -> frozenset[str]:
    return frozenset(name for name, p in inspect.signature(function).parameters.items()
                     if p.kind is not inspect.Parameter.VAR_KEYWORD)


def _chunked_loss_applies(lm, tokens: int) -> bool:
    """The chunked output layer + loss (``chunked_loss``) stands in for Megatron's own output
    layer only: not under sequence parallelism (its input is gathered first) nor for a wrapped
    one; and only where it pays (``chunking_pays``: large vocabularies and micro-batches)."""
    layer = lm.output_layer
    if type(layer) not in (ColumnParallelLinear, FusedBiasColumnParallelLinear) or layer.bias is not None \
            or layer.sequence_parallel:
        return False
    return chunking_pays(tokens, layer.output_size_per_partition)


def _mask_for_split(mask, input_ids: torch.Tensor, split):
    """The structural mask over the padded full sequence (padding as segment -1), carrying the
    split so that attention gathers keys and attends this rank's query chunks."""
    segments = mask.segment_ids
    if segments is not None and bool((segments == 0).all()):
        # One sample per row and no padding: under a causal mask the padding appended below is
        # never seen by a real token (it comes last), so the mask stays plain (no mask tensor).
        segments = None
    if segments is not None:
        segments = pad_tokens(segments, split.length, 1, -1)
    spans = pad_tokens(mask.span_ids, split.length, 1, -1) if mask.span_ids is not None else None
    return dataclasses.replace(mask, segment_ids=segments, span_ids=spans, context=split, _cache={})
