"""Every registered recipe builds a config the trainer accepts: its name, a global batch that the
micro-batch divides at its data-parallel size 1, and layouts that name real parallel sizes."""

from __future__ import annotations

import math

import pytest

from vlm_bridge.recipes import all_recipes, get_recipe


@pytest.mark.parametrize("name", sorted(all_recipes()))
def test_recipe_builds_a_consistent_config(name):
    cfg = get_recipe(name)
    assert cfg.name == name
    assert cfg.micro_batch_size >= 1 and cfg.global_batch_size % cfg.micro_batch_size == 0
    p = cfg.parallel
    assert min(p.tp, p.pp, p.ep, p.cp) >= 1
    from vlm_bridge.train.config import check_config

    check_config(cfg)  # every value is one a run can use


def test_gemma_4b_lora_packs_several_rows_per_micro_batch():
    assert get_recipe("gemma3_vl_4b_lora").micro_batch_size == 4
    assert get_recipe("gemma3_vl_27b_lora").micro_batch_size == 1


def test_unknown_recipe_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available: .*gemma3_vl_4b_lora"):
        get_recipe("nope")


@pytest.mark.parametrize("override, needle", [
    ("micro_batch_size=0", "micro_batch_size must be >= 1"),
    ("peft.rank=0", "peft.rank must be >= 1"),
    ("log_every=0", "log_every must be >= 1"),
    ("steps=0", "steps must be >= 1"),
    ("data.seq_len=0", "data.seq_len must be >= 1"),
    ("dtype=fp8", "dtype"),
    ("recompute_layers=-1", "recompute_layers must be >= 0"),
    ("recompute_components=vision,visual", "recompute_components: visual is not a component"),
    ("eval.metrics=anls", "eval.metrics=anls scores generated answers, and eval.generate is false"),
    ("optim.lr=1e-7", "optim.min_lr .* is above optim.lr 1e-07"),
    ("optim.initial_loss_scale=-1", "optim.initial_loss_scale must be >= 0"),
    ("data.workers=100000", r"data.workers=100000 is more than this machine's \d+ CPUs"),
    ("optim.schedule=step", "optim.schedule: 'step' is not one of cosine, linear, constant, wsd"),
    ("optim.decay_steps=5", "optim.decay_steps=5 sets the final decay of optim.schedule=wsd"),
    ("optim.schedule=wsd;optim.decay_steps=500;steps=100", "optim.decay_steps=500 is longer than the run"),
    ("optim.schedule=wsd;optim.decay_steps=95;steps=100;optim.warmup_steps=10",
     r"optim.decay_steps=95 is longer than the run after its warmup \(steps=100, optim.warmup_steps=10\)"),
    ("eval.generate=true;parallel.cp=2;data.validation=jsonl:val.jsonl",
     r"eval.generate=true: generation does not run with context parallelism \(parallel.cp=2\)"),
    ("eval.generate=true;eval.metrics=no_such_module:f",
     "eval.metrics 'no_such_module:f': cannot import it"),
])
def test_values_no_run_can_use_are_named_by_their_keys(override, needle, tmp_path):
    from vlm_bridge.train.config import apply_overrides, check_config

    with pytest.raises(ValueError, match=needle):
        check_config(apply_overrides(get_recipe("demo_tiny"), override.split(";")))


def test_output_dir_must_not_be_the_pretrained_folder(tmp_path):
    from vlm_bridge.train.config import check_config

    cfg = get_recipe("demo_tiny")
    cfg.pretrained, cfg.output_dir = str(tmp_path / "model"), str(tmp_path / "model" / ".." / "model")
    with pytest.raises(ValueError, match="is the --pretrained model's folder"):
        check_config(cfg)


@pytest.mark.parametrize("schedule,expected", [
    # warmup 2 of 10 steps from 0 to 1e-3, then down to 1e-4 (or not)
    ("cosine", [0.0, 5e-4] + [1e-4 + 4.5e-4 * (math.cos(math.pi * k / 8) + 1) for k in range(8)]),
    ("linear", [0.0, 5e-4, 1e-3, 8.875e-4, 7.75e-4, 6.625e-4, 5.5e-4, 4.375e-4, 3.25e-4, 2.125e-4]),
    ("constant", [0.0, 5e-4] + [1e-3] * 8),
    ("wsd", [0.0, 5e-4] + [1e-3] * 6 + [7e-4, 4e-4]),  # decay_steps=3, min_lr after the last step
])
def test_learning_rate_schedules(schedule, expected):
    import torch

    from vlm_bridge.train.config import apply_overrides, check_config
    from vlm_bridge.train.trainer import build_scheduler

    over = [f"optim.schedule={schedule}", "steps=10", "optim.warmup_steps=2", "optim.lr=1e-3",
            "optim.min_lr=1e-4"] + (["optim.decay_steps=3"] if schedule == "wsd" else [])
    cfg = apply_overrides(get_recipe("demo_tiny"), over)
    check_config(cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = build_scheduler(cfg, optimizer)
    rates = []
    for _ in range(cfg.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    assert rates == pytest.approx(expected, abs=1e-6), rates
