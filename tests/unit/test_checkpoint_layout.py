"""Which saved RNG states a resume may restore: only those of the same rank layout."""

from __future__ import annotations

import pytest


@pytest.fixture
def layout(monkeypatch):
    from vlm_bridge.train import checkpoint

    def set_layout(tp=1, pp=1, cp=1, ep=1, world=1):
        ps = checkpoint.parallel_state
        monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: tp)
        monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: pp)
        monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda: cp)
        monkeypatch.setattr(ps, "get_expert_model_parallel_world_size", lambda: ep)
        monkeypatch.setattr(checkpoint.dist, "get_world_size", lambda: world)
        return checkpoint

    return set_layout


def test_data_and_context_parallel_runs_of_one_world_size_are_different_layouts(layout):
    saved = layout(world=2)._layout()  # DP=2
    assert layout(cp=2, world=2)._same_layout(saved) is False
    assert layout(ep=2, world=2)._same_layout(saved) is False
    assert layout(world=2)._same_layout(saved) is True
    assert layout(tp=2, world=2)._same_layout(saved) is False


def test_checkpoints_named_before_cp_and_ep_still_restore_at_their_layout(layout):
    assert layout(tp=2, world=2)._same_layout("tp2pp1w2") is True
    assert layout(world=2)._same_layout("tp2pp1w2") is False
    assert layout()._same_layout(None) is False
