"""On a CUDA machine: the same parity on the GPU (fp32 without TF32, and bf16)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_tf32():
    # HF's Conv3d patch embedding would otherwise run in TF32 through cuDNN while ours is a matmul.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_fp32_parity_on_gpu(tiny_hf, parity):
    report = parity(tiny_hf, None)
    assert report["max_abs_diff"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0


def test_bf16_parity_on_gpu(tiny_hf, parity):
    report = parity(tiny_hf, None, dtype="bf16")
    assert report["kl_divergence"] < 1e-2, report
    assert report["top1_agreement"] >= 0.9, report


def test_round_trip_on_gpu(tiny_hf, run_cli, tmp_path):
    from vlm_bridge.testing.checks import checkpoint_mismatches

    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", tiny_hf, "--megatron-path", meg) == 0
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(tiny_hf, out) == []
