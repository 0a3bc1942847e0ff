"""Encoding workers fork from a rank that already holds a CUDA context (they never touch CUDA):
a GPU fine-tune with them trains on the same batches as without."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import run_parallel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_workers_forked_from_a_cuda_rank_give_the_same_losses(tmp_path):
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.testing.shapes_task import make_task
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl
    from vlm_bridge.train.config import apply_overrides
    from vlm_bridge.train.trainer import train

    hf = build_tiny_qwen2_5_vl(tmp_path / "hf")
    data = make_task(tmp_path / "shapes", n_train=24, n_eval=0)["train"]
    losses = {}
    for workers in (0, 2):
        cfg = apply_overrides(get_recipe("demo_tiny"), [
            "steps=4", "global_batch_size=4", "micro_batch_size=2", f"data.workers={workers}",
            "tensorboard=false", "optim.warmup_steps=1"])
        cfg.pretrained, cfg.output_dir = str(hf), str(tmp_path / f"run{workers}")
        cfg.data.train = f"jsonl:{data}"
        losses[workers] = run_parallel(train, 1, cfg)["losses"]
    assert losses[2] == pytest.approx(losses[0], rel=1e-5), losses
