"""The family contract: everything shared code may ask of a model family, declared in one place.

Shared code (conversion, training, PEFT, verify, data) never names a family; it asks the
:class:`Family` object found by the registry. A family declares

* how to build it: ``build_configs`` (HF config -> Megatron configs + settings), ``build_model``
  (a :class:`~vlm_bridge.families._common.vlm.VLMModel` subclass), ``weight_table``, ``layouts``;
* its **components** and their Megatron parameter prefixes (freeze flags, per-component learning
  rates, LoRA components) and the HF module paths of its hub tensors (HF-PEFT export);
* the **processor outputs** it consumes: ``media_keys`` (concatenated over the samples of a
  batch, passed to the model) and ``token_keys`` (per-token ``[b, s]`` extras such as token types,
  packed along the sequence like ``input_ids``);
* how **positions** are computed per sample (``position_ids``: 1-D ``[b, s]`` or ``[P, b, s]``);
* where its **vision features** can be observed on the HF model (verify);
* its **recipes** and its **tiny test builder** (tests are parametrized over the registry);
* its **foreign forms**: hub architectures whose folders need their own Python code (``auto_map``),
  read instead through a config translation and a processor built from transformers classes.

Anything the conversion needs to carry in checkpoint metadata (key layout, expert layout) is
recorded by the loader for every family alike (see ``vlm_bridge.loading.conversion_meta``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_bridge.convert.layout import KeyLayout

# Components every family maps its parameters onto; shared code iterates over these names.
COMPONENTS = ("language_model", "vision", "projector")


@dataclass(frozen=True)
class ForeignForm:
    """A hub form of a family whose ``config.json`` and processor files name the folder's own
    code: read without running it, as the family's transformers-native config and a processor."""

    # the folder's raw config.json -> a transformers config this family's build_configs takes
    config: Callable[[dict], object]
    # (folder, its raw config.json) -> a processor (the native form's outputs, the folder's chat
    # template)
    processor: Callable[[Path, dict], object]


@dataclass(frozen=True)
class Family:
    """A registered model family. Nothing outside the family folder branches on its name."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    # (hf_config, dtype, tp, pp, ep) -> (language TransformerConfig, vision TransformerConfig, settings)
    build_configs: Callable
    # (language, vision, settings, pre_process, post_process) -> VLMModel
    build_model: Callable
    # (language, vision, settings) -> list[Entry]
    weight_table: Callable
    layouts: list[KeyLayout]
    # component -> Megatron parameter-name prefixes; every parameter belongs to exactly one
    components: Mapping[str, tuple[str, ...]]
    # hub tensor-name prefix -> module path in the model transformers builds (HF-PEFT names)
    hf_module_prefixes: Mapping[str, str]
    # processor outputs passed to the model besides input_ids / attention_mask
    media_keys: tuple[str, ...]
    # (settings, batch of processor outputs, one or more rows) -> position ids [b, s] or [P, b, s]
    position_ids: Callable[[object, dict], torch.Tensor]
    # dotted path of the HF module whose output is the vision features fed to the LM (verify)
    hf_vision_module: str
    # "module:function" of the tiny test-model builder, (folder, **options) -> folder
    tiny_builder: str
    # per-token processor outputs ([b, s]) the model consumes, packed along the sequence
    token_keys: tuple[str, ...] = ()
    # media kinds the family's processor and model take ("image", "video")
    modalities: tuple[str, ...] = ("image", "video")
    # the HF processor/model take a video only as a one-prompt batch with no images
    video_batch_alone: bool = False
    # recipe name -> function returning a TrainConfig
    recipes: Mapping[str, Callable] = field(default_factory=dict)
    # options for tiny_builder that give the variants the tests cover (e.g. tied embeddings)
    tiny_variants: Mapping[str, dict] = field(default_factory=lambda: {"default": {}})
    # why this family cannot split sequences over context-parallel ranks ("" when it can)
    no_context_parallel: str = ""
    # tiny-builder options under which cached decoding equals a full forward; needed where HF's own
    # decoding step differs from its forward (e.g. a Mamba dt floor in the chunked scan only)
    tiny_decode_options: Mapping[str, object] = field(default_factory=dict)
    # regexes of non-weight tensors on disk (index buffers, identity scales) kept as they are
    # through a round trip (convert/passthrough.py), and a check that may refuse their values
    passthrough: tuple[str, ...] = ()
    check_passthrough: Callable[[object, str, torch.Tensor], None] | None = None
    # hub architecture -> how to read folders of that form without their remote code
    foreign_forms: Mapping[str, ForeignForm] = field(default_factory=dict)

    def hf_module_path(self, hf_tensor: str) -> str:
        """Hub tensor name -> the module path transformers gives it in memory (HF PEFT keys)."""
        module = hf_tensor.rsplit(".", 1)[0]
        for src, dst in self.hf_module_prefixes.items():
            if (module + ".").startswith(src):  # the prefix may name the module itself
                return (dst + (module + ".")[len(src):]).rstrip(".")
        return module

    def model_inputs(self, settings, batch: Mapping) -> dict:
        """Processor outputs (a padded batch) -> model forward kwargs, for any family."""
        from vlm_bridge.attention.core import AttentionMask

        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": self.position_ids(settings, dict(batch)),
            "attention_mask": AttentionMask.from_padding(batch.get("attention_mask")),
        }
        for key in (*self.media_keys, *self.token_keys):
            if batch.get(key) is not None:
                inputs[key] = batch[key]
        return inputs

    def build_tiny(self, folder, **options):
        """Write this family's tiny test checkpoint (random weights, real processor) to ``folder``."""
        module, _, function = self.tiny_builder.partition(":")
        return getattr(importlib.import_module(module), function)(folder, **options)
