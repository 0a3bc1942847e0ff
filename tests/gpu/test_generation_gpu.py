"""On a GPU: decoding replayed from a captured CUDA graph gives the tokens of eager decoding and of
HF ``generate`` (fp32, tiny models of every family), and its cached logits match a full forward."""

from __future__ import annotations

import pytest

from vlm_bridge.parallel import ParallelConfig, run_parallel
from vlm_bridge.registry import FAMILIES
from vlm_bridge.testing.generation import generation_parity, parity_requests, write_parity_media

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_cuda_graph_decoding_matches_eager_and_hf(family, tmp_path):
    folder = family.build_tiny(tmp_path / "hf", **family.tiny_decode_options)
    batches = parity_requests(family, write_parity_media(tmp_path / "media"))
    graph = run_parallel(generation_parity, 1, str(folder), ParallelConfig(), batches, 12, True, "auto")
    eager = run_parallel(generation_parity, 1, str(folder), ParallelConfig(), batches, 12, True, "eager")
    assert graph["ours"] == eager["ours"] == graph["hf"]
    # Loose: with fla-core installed the full forward of Nemotron runs the Triton scan (TF32 inner
    # products, 8e-3 observed) while decoding runs the fp32 torch scan; the CPU tests hold 1e-4.
    assert graph["cache_max_diff"] <= 2e-2 and eager["cache_max_diff"] <= 2e-2
