"""What a family provides to the engine, trainer and CLI: configs, model, weight table, layouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlm_bridge.convert.layout import KeyLayout


@dataclass(frozen=True)
class Family:
    """A registered model family. Nothing outside the family folder branches on its name."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    # (hf_config, dtype, tp, pp) -> (language TransformerConfig, vision TransformerConfig, settings)
    build_configs: Callable
    # (language, vision, settings, pre_process, post_process) -> MegatronModule
    build_model: Callable
    # (language, vision, settings) -> list[Entry]
    weight_table: Callable
    layouts: list[KeyLayout]
    # (settings, batch of HF processor outputs) -> dict of model forward kwargs
    prepare_inputs: Callable
