"""Assertions shared by the per-family tests (a plain module: pool workers import it by name)."""

from __future__ import annotations

TOL = 1e-4


def assert_parity(report: dict, layers: bool = True) -> None:
    """fp32 parity on the mixed batch: logits, argmax, vision tower, every decoder layer."""
    assert report["tokens"] > 50, report  # at least an image row and a text row
    assert report["max_abs_diff"] <= TOL, report
    assert report["top1_agreement"] == 1.0, report
    assert report["vision_max_abs_diff"] is not None and report["vision_max_abs_diff"] <= TOL, report
    if layers:
        assert max(report["layer_max_abs_diff"]) <= TOL, report
    assert report["passed"], report
