"""Qwen3-VL dense and MoE: logits equal HF's; round trips are bit-exact in every expert layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_bridge.testing.checks import checkpoint_mismatches

TOL = 1e-4


def assert_parity(report: dict) -> None:
    assert report["tokens"] > 100, report
    assert report["max_abs_diff"] <= TOL, report
    assert report["top1_agreement"] == 1.0, report
    assert report["vision_max_abs_diff"] <= TOL, report
    assert max(report["layer_max_abs_diff"]) <= TOL, report


def _rewrite(src, dst, fn):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    save_file(fn(tensors), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _hub_order(tensors):
    """The inner order of the official hub checkpoints: [E, H, 2I] and [E, I, H]."""
    return {k: v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) else v
            for k, v in tensors.items()}


def _per_expert(tensors):
    out = {}
    for k, v in tensors.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            for e, w in enumerate(v):
                gate, up = w.chunk(2)
                out[f"{prefix}{e}.gate_proj.weight"] = gate.clone()
                out[f"{prefix}{e}.up_proj.weight"] = up.clone()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e, w in enumerate(v):
                out[f"{prefix}{e}.down_proj.weight"] = w.clone()
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("variant", ["dense", "fused_out_in", "fused_hub", "per_expert"])
def test_round_trip_bit_exact(variant, tiny_qwen3, tiny_qwen3_moe, run_cli, tmp_path):
    src = {"dense": tiny_qwen3, "fused_out_in": tiny_qwen3_moe}.get(variant)
    if variant == "fused_hub":
        src = _rewrite(tiny_qwen3_moe, tmp_path / "hub", _hub_order)
    elif variant == "per_expert":
        src = _rewrite(tiny_qwen3_moe, tmp_path / "per", _per_expert)
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", src, "--megatron-path", meg) == 0
    assert json.loads((meg / "vlm_bridge.json").read_text())["expert_layout"] == (
        "per_expert" if variant == "dense" else variant)
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(src, out) == []


def test_hub_order_gives_the_same_logits(tiny_qwen3_moe, parity, tmp_path):
    hub = _rewrite(tiny_qwen3_moe, tmp_path / "hub", _hub_order)
    assert_parity(parity(hub, None))


def test_inconsistent_fused_experts_fail_loudly(tiny_qwen3_moe, run_cli, capsys, tmp_path):
    """A square gate_up whose 2I disagrees with down_proj's I: one line naming both tensors."""
    def square(tensors):
        return {k: (torch.zeros(4, 64, 64) if k.endswith("gate_up_proj") else v)
                for k, v in tensors.items()}

    bad = _rewrite(tiny_qwen3_moe, tmp_path / "bad", square)
    capsys.readouterr()
    assert run_cli("import", "--hf-model", bad, "--megatron-path", tmp_path / "meg") == 2
    err = capsys.readouterr().err
    assert "disagree on the expert intermediate size" in err and "gate_up_proj" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "meg").exists()


def test_export_in_a_named_expert_layout(tiny_qwen3_moe, run_cli, tmp_path):
    """Imported fused ([E, 2I, H]), exported per expert on request: same tensors, other keys."""
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", tiny_qwen3_moe, "--megatron-path", meg) == 0
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out,
                   "--expert-layout", "per_expert") == 0
    expected = _rewrite(tiny_qwen3_moe, tmp_path / "per", _per_expert)
    assert checkpoint_mismatches(expected, out) == []
