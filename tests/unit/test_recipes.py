"""Every registered recipe builds a config the trainer accepts: its name, a global batch that the
micro-batch divides at its data-parallel size 1, and layouts that name real parallel sizes."""

from __future__ import annotations

import pytest

from vlm_bridge.recipes import all_recipes, get_recipe


@pytest.mark.parametrize("name", sorted(all_recipes()))
def test_recipe_builds_a_consistent_config(name):
    cfg = get_recipe(name)
    assert cfg.name == name
    assert cfg.micro_batch_size >= 1 and cfg.global_batch_size % cfg.micro_batch_size == 0
    p = cfg.parallel
    assert min(p.tp, p.pp, p.ep, p.cp) >= 1


def test_gemma_4b_lora_packs_several_rows_per_micro_batch():
    assert get_recipe("gemma3_vl_4b_lora").micro_batch_size == 4
    assert get_recipe("gemma3_vl_27b_lora").micro_batch_size == 1


def test_unknown_recipe_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available: .*gemma3_vl_4b_lora"):
        get_recipe("nope")
