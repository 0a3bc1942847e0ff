"""Generation for every registered family: greedy decoding from the KV cache (and Mamba state)
gives exactly HF ``generate``'s tokens on the same processor inputs (two images, a video, text only,
prompts of different lengths in one batch), at TP=1, TP=2 and PP=2; every cached step's logits equal
a full forward over the whole sequence."""

from __future__ import annotations

import pytest

from vlm_bridge.parallel import ParallelConfig, run_parallel
from vlm_bridge.registry import FAMILIES
from vlm_bridge.testing.generation import generation_parity, parity_requests, write_parity_media

NEW_TOKENS = 10
CACHE_TOL = 1e-4  # fp32; observed 2e-7 to 5e-6


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, str]:
    return write_parity_media(tmp_path_factory.mktemp("generation_media"))


def _assert_same_tokens(report: dict) -> None:
    assert report["steps"] > 0
    for batch, (ours, theirs) in enumerate(zip(report["ours"], report["hf"], strict=True)):
        for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert a == b, f"batch {batch} row {row}: ours {a} vs HF {b}"


def test_greedy_matches_hf_generate_and_cache_matches_full_forward(case, media, tmp_path):
    """Decoding runs the fixed-shape step a CUDA graph replays (whole-cache attention under a key
    mask, in-place state), uncaptured; the eager step runs in the PP=2 test below."""
    family, folder = case
    decode = "static"
    batches = parity_requests(family, media)
    report = run_parallel(generation_parity, 1, str(folder), ParallelConfig(), batches, NEW_TOKENS,
                          not family.tiny_decode_options, decode)
    _assert_same_tokens(report)
    if family.tiny_decode_options:  # the cache check needs HF's decoding to equal its forward
        exact = family.build_tiny(tmp_path / "hf", **family.tiny_decode_options)
        report = run_parallel(generation_parity, 1, str(exact), ParallelConfig(), batches, NEW_TOKENS,
                              True, decode)
        _assert_same_tokens(report)
    assert report["cache_max_diff"] <= CACHE_TOL


@pytest.mark.parametrize("layout", [ParallelConfig(tp=2), ParallelConfig(pp=2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_greedy_matches_hf_generate_at_layout(family, layout, tiny_models, media):
    folder = tiny_models(family.name)
    batches = parity_requests(family, media)
    # TP=2 decodes with the static step (what a graph replays), PP=2 through the pipeline schedule.
    decode = "static" if layout.pp == 1 else "eager"
    report = run_parallel(generation_parity, layout.tp * layout.pp, str(folder), layout, batches, 6,
                          not family.tiny_decode_options, decode)
    _assert_same_tokens(report)
    if not family.tiny_decode_options:
        assert report["cache_max_diff"] <= CACHE_TOL
