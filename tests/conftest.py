"""Shared fixtures: tiny Qwen2.5-VL checkpoints built locally (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """Untied tiny Qwen2.5-VL, fp32, hub key layout."""
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory) -> Path:
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_tied") / "hf", tie_word_embeddings=True)


def cli(*args) -> int:
    """Run the CLI in-process (multi-rank commands still spawn their ranks)."""
    from vlm_bridge.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_megatron(tiny_hf, tmp_path_factory) -> Path:
    """``tiny_hf`` imported at TP=1 (in-process)."""
    out = tmp_path_factory.mktemp("tiny_meg") / "megatron"
    assert cli("import", "--hf-model", str(tiny_hf), "--megatron-path", out) == 0
    return out


@pytest.fixture
def run_cli():
    return cli


def verify_report(hf: Path, megatron: Path | None, tp: int = 1, pp: int = 1, dtype=None) -> dict:
    """Parity report of HF vs Megatron on two images of different sizes, a video and a text row."""
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    parallel = ParallelConfig(tp=tp, pp=pp)
    return run_parallel(
        verify, tp * pp, str(hf), str(megatron) if megatron else None, parallel, [], None,
        DEFAULT_PROMPT, dtype, None,
    )


@pytest.fixture
def parity():
    return verify_report


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    from vlm_bridge.testing.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("q3") / "hf")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    """MoE with experts fused as transformers 5.24 saves them: [E, 2I, H] / [E, H, I]."""
    from vlm_bridge.testing.tiny_qwen3_vl import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("q3moe") / "hf", moe=True)
