"""Recipes: functions returning a :class:`TrainConfig`, looked up by name."""

from __future__ import annotations

from collections.abc import Callable

from vlm_bridge.recipes import qwen2_5_vl, qwen3_vl
from vlm_bridge.train.config import TrainConfig

RECIPES: dict[str, Callable[[], TrainConfig]] = {**qwen2_5_vl.RECIPES, **qwen3_vl.RECIPES}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
