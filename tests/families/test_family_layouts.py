"""Per family, with real gloo processes: parity and bit-exact export at TP=2 and PP=2, a TP=1
checkpoint loaded at TP=2, and, for MoE families, experts split over EP=2."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_parity

from vlm_bridge.testing.checks import checkpoint_mismatches

pytestmark = pytest.mark.slow


def _verify(hf, meg, tp=1, pp=1, ep=1) -> dict:
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    return run_parallel(verify, tp * pp * ep, str(hf), str(meg) if meg else None,
                        ParallelConfig(tp=tp, pp=pp, ep=ep), [], None, DEFAULT_PROMPT, None, None)


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")], ids=["tp2", "pp2"])
def test_import_verify_export_at_layout(case, run_cli, tmp_path, layout):
    """Imported at the layout, verified there, exported at TP=1 x PP=1 (another layout): bit-exact."""
    _, hf = case
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hf, "--megatron-path", meg, *layout) == 0
    tp, pp = (2, 1) if layout[0] == "--tp" else (1, 2)
    assert_parity(_verify(hf, meg, tp=tp, pp=pp))
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(hf, out) == []


def test_tp1_checkpoint_at_tp2(case, run_cli, tmp_path):
    """A TP=1 checkpoint verified at TP=2 in memory-free form and exported at TP=2: bit-exact."""
    _, hf = case
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hf, "--megatron-path", meg) == 0
    assert_parity(_verify(hf, meg, tp=2))
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out, "--tp", "2") == 0
    assert checkpoint_mismatches(hf, out) == []


def test_experts_over_ep2(case, run_cli, tmp_path):
    """MoE families: imported with experts split over 2 ranks, verified at EP=2, exported at EP=1
    in the layout they came in."""
    family, hf = case
    from vlm_bridge.loading import load_hf_config

    language, _, _ = family.build_configs(load_hf_config(hf), torch.float32)
    if not language.num_moe_experts:
        pytest.skip("dense model: no experts to split")
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hf, "--megatron-path", meg, "--ep", "2") == 0
    assert_parity(_verify(hf, meg, ep=2))
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(hf, out) == []
