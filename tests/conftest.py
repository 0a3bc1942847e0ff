"""Shared fixtures: tiny Qwen2.5-VL checkpoints built locally (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_finish(session):
    """Everything imported while collecting lives as long as the session: frozen, the collector
    that runs every so often while tests allocate no longer walks it each time."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fixtures and words that mark a test as one that launches ranks (run_parallel or the CLI).
_RANK_FIXTURES = {"run_cli", "parity", "tiny_megatron", "tiny_cfg"}


def _launches_ranks(item, sources: dict) -> bool:
    if _RANK_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    path = str(item.path)
    if path not in sources:
        sources[path] = "run_parallel" in item.path.read_text() if item.path.suffix == ".py" else False
    return sources[path]


@pytest.fixture(scope="session", autouse=True)
def worker_pool(request):
    """Send every run_parallel job (single-rank ones and the CLI's included) to long-lived workers.

    Importing torch and Megatron in a freshly spawned rank costs seconds per call; the pool pays it
    once per worker. ``VLM_BRIDGE_TEST_WORKERS`` sets the number of workers (default 2; 0 spawns per
    call as without a pool). Jobs with more ranks than workers still spawn. Workers start at once
    when a collected test launches ranks (their imports overlap with fixture building), otherwise
    on first use.
    """
    from vlm_bridge.parallel import WorkerPool, use_worker_pool

    size = int(os.environ.get("VLM_BRIDGE_TEST_WORKERS", "2"))
    if size <= 0:
        yield None
        return
    pool = WorkerPool(size)
    sources: dict = {}
    if any(_launches_ranks(item, sources) for item in request.session.items):
        pool.start()
    try:
        with use_worker_pool(pool):
            yield pool
    finally:
        pool.shutdown()


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
    """Run the CLI in-process; its ranks run in the session's worker pool (or are spawned).

    The environment is restored afterwards: the conversion commands tune the allocator through
    environment variables meant for their own process, which processes spawned by later tests
    would otherwise inherit."""
    from vlm_bridge.cli import main

    saved = dict(os.environ)
    try:
        return main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_megatron(tiny_hf, tmp_path_factory) -> Path:
    """``tiny_hf`` imported at TP=1 (in-process)."""
    out = tmp_path_factory.mktemp("tiny_meg") / "megatron"
    assert cli("import", "--hf-model", str(tiny_hf), "--megatron-path", out) == 0
    return out


@pytest.fixture
def run_cli():
    return cli


def verify_report(hf: Path, megatron: Path | None, tp: int = 1, pp: int = 1, dtype=None,
                  cp: int = 1) -> dict:
    """Parity report of HF vs Megatron on two images of different sizes, a video and a text row."""
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    parallel = ParallelConfig(tp=tp, pp=pp, cp=cp)
    return run_parallel(
        verify, tp * pp * cp, str(hf), str(megatron) if megatron else None, parallel, [], None,
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


@pytest.fixture(scope="session")
def nemotron_v2(tmp_path_factory) -> Path:
    """The original NemotronH_Nano_VL_V2 hub form (remote-code config, V2 key names, a tokenizer
    without a pad token, as the upload's)."""
    from vlm_bridge.testing.tiny_nemotron_vl import build_tiny_nemotron_vl

    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("nemotron_v2") / "hf", form="v2", pad_token=False)
