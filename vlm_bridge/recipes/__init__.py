"""Recipes: functions returning a :class:`TrainConfig`, looked up by name.

Each family declares its own recipes (``families/<family>/recipes.py``); the registry collects them.
"""

from __future__ import annotations

from collections.abc import Callable

from vlm_bridge.train.config import TrainConfig


def all_recipes() -> dict[str, Callable[[], TrainConfig]]:
    from vlm_bridge.recipes.demo import demo_tiny
    from vlm_bridge.registry import FAMILIES

    recipes: dict[str, Callable[[], TrainConfig]] = {"demo_tiny": demo_tiny}
    for family in FAMILIES:
        recipes.update(family.recipes)
    return recipes


def get_recipe(name: str) -> TrainConfig:
    recipes = all_recipes()
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(recipes))}")
    return recipes[name]()
