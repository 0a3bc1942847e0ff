"""The verify report says where parity broke, NaN included (every comparison with NaN is false, so
a threshold alone found no divergent layer and the report said "none")."""

from __future__ import annotations

import math

from vlm_bridge.verify import VerifyReport, format_report

NAN = math.nan


def _report(**changes) -> dict:
    base = VerifyReport(max_abs_diff=NAN, mean_abs_diff=NAN, kl_divergence=NAN, top1_agreement=0.0,
                        tokens=8, dtype="float32", tolerance=1e-3, passed=False)
    return {**base.to_dict(), **changes}


def test_nan_from_the_vision_tower_is_named():
    text = format_report(_report(vision_max_abs_diff=NAN, layer_max_abs_diff=[NAN, NAN],
                                 first_divergent_layer=0, nonfinite_logits=["Megatron"]))
    assert "first divergence     vision tower (nan)" in text
    assert "non-finite logits    Megatron (nan or inf" in text and text.endswith("FAIL")


def test_nan_in_both_sides_names_both_and_a_finite_report_has_no_such_line():
    text = format_report(_report(layer_max_abs_diff=[1e-7, NAN], first_divergent_layer=1,
                                 nonfinite_logits=["HF", "Megatron"]))
    assert "first divergence     decoder layer 1" in text and "non-finite logits    HF and Megatron" in text
    fine = format_report(_report(max_abs_diff=1e-7, mean_abs_diff=1e-8, kl_divergence=0.0, top1_agreement=1.0,
                                 passed=True, layer_max_abs_diff=[1e-7]))
    assert "first divergence     none" in fine and "non-finite" not in fine and fine.endswith("PASS")
