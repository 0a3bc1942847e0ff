"""Context parallelism for every registered family that supports it: CP=2 (and TP=2 x CP=2, and
EP=2 with CP=2 for MoE) gives the logits of CP=1 on verify's batch (images, a video, a text row,
left-padded) and on a packed row of several samples with padding; a family that cannot split its
sequences refuses ``--cp`` with one line. ``verify`` at CP=2 passes the full parity check, vision
tower included."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import ParallelConfig, run_parallel
from vlm_bridge.registry import FAMILIES
from vlm_bridge.testing.context_parallel import layout_logits, packed_samples

CP_FAMILIES = [f for f in FAMILIES if not f.no_context_parallel]
TOL = 1e-5  # fp32; observed up to ~1e-6


@pytest.fixture(scope="session")
def video_frames(tmp_path_factory) -> str:
    from vlm_bridge.testing.generation import write_parity_media

    return write_parity_media(tmp_path_factory.mktemp("cp_media"))["video"]


def _max_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(float(abs(x - y).max()) for x, y in zip(a, b))





@pytest.mark.parametrize("family", CP_FAMILIES, ids=lambda f: f.name)
def test_cp2_logits_equal_cp1(family, tiny_models, shapes_jsonl, video_frames):
    folder = str(tiny_models(family.name))
    samples = packed_samples(family, shapes_jsonl, video_frames)
    layouts = [ParallelConfig(), ParallelConfig(cp=2)]
    if family.name == "gemma3_vl":  # the richest mask: image spans and sliding windows
        layouts.append(ParallelConfig(tp=2, cp=2))
    if "moe" in family.name:
        layouts.append(ParallelConfig(cp=2, ep=2))
    results = [run_parallel(layout_logits, p.conversion_world_size, folder, p, samples)["logits"]
               for p in layouts]
    for layout, logits in zip(layouts[1:], results[1:]):
        assert _max_diff(results[0], logits) <= TOL, layout
    assert all(torch.isfinite(torch.from_numpy(t)).all() for t in results[0])


@pytest.mark.parametrize("family", CP_FAMILIES, ids=lambda f: f.name)
def test_verify_at_cp2_compares_the_vision_tower_too(family, tiny_models, parity):
    """Each CP rank encodes a share of the media; verify compares the features gathered for all of
    them (it reported no vision difference at all under CP)."""
    from family_checks import assert_parity

    assert_parity(parity(str(tiny_models(family.name)), None, cp=2))


def test_a_family_without_context_parallelism_refuses_cp(run_cli, tiny_models, capfd):
    refusing = [f for f in FAMILIES if f.no_context_parallel]
    if not refusing:
        pytest.skip("every registered family supports context parallelism")
    folder = tiny_models(refusing[0].name)
    capfd.readouterr()
    assert run_cli("verify", "--hf-model", folder, "--cp", "2") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not support it" in err[0]
    assert "context parallelism 2 (--cp, or parallel.cp in finetune)" in err[0]
