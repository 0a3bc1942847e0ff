"""Fixtures for training tests: the shapes task on the tiny model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from vlm_bridge.testing.shapes_task import make_task

    return make_task(tmp_path_factory.mktemp("shapes"), n_train=64, n_eval=16, size=56)


@pytest.fixture
def tiny_cfg(tiny_hf, shapes_data, tmp_path):
    """A fast fp32 config; tests override what they exercise."""

    def make(**over):
        from vlm_bridge.recipes import get_recipe
        from vlm_bridge.train.config import apply_overrides

        cfg = get_recipe("demo_tiny")
        cfg.pretrained = str(tiny_hf)
        cfg.output_dir = str(tmp_path / "run")
        cfg.data.train = f"jsonl:{shapes_data['train']}"
        cfg.steps, cfg.global_batch_size, cfg.micro_batch_size = 4, 4, 2
        cfg.optim.warmup_steps = 1
        apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])
        return cfg

    return make


def run_train(cfg, world: int = 1, stop_after=None):
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.train.trainer import train

    return run_parallel(train, world, cfg, stop_after)
