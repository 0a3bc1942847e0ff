"""Answer metrics on hand-checked cases: exact match after SQuAD normalisation, DocVQA's ANLS with
its 0.5 threshold, the best score over several references, and user metrics by module path."""

from __future__ import annotations

import pytest

from vlm_bridge.inference.evaluate import score_answers
from vlm_bridge.inference.metrics import anls, exact_match, levenshtein, resolve_metric


def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    assert exact_match("The  Red circle.", ["red circle"]) == 1.0
    assert exact_match("red", ["blue", "Red!"]) == 1.0
    assert exact_match("red square", ["red circle"]) == 0.0


@pytest.mark.parametrize("answer, refs, expected", [
    ("hello", ["hello"], 1.0),
    ("helo", ["hello"], 0.8),  # one deletion over 5 characters
    ("HELLO ", ["hello"], 1.0),  # case and outer spaces do not count
    ("abc", ["xyz"], 0.0),  # distance 1.0 >= 0.5
    ("abcd", ["abxy"], 0.0),  # distance exactly 0.5: under the threshold only
    ("abcde", ["abxde", "zzzzz"], 0.8),  # the best reference counts
    ("", [""], 1.0),
])
def test_anls(answer, refs, expected):
    assert anls(answer, refs) == pytest.approx(expected)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_score_answers_means_over_scored_rows_only():
    rows, means = score_answers(["red", "circle", "blue"], [["red"], [], ["green", "blue"]],
                                ("exact_match", "anls"))
    assert "scores" not in rows[1] and rows[2]["scores"] == {"exact_match": 1.0, "anls": 1.0}
    assert means == {"exact_match": 1.0, "anls": 1.0}
    rows, means = score_answers(["rod", "blue"], [["red"], ["green"]], ("exact_match", "anls"))
    assert means["exact_match"] == 0.0 and means["anls"] == pytest.approx((1 - 1 / 3) / 2)


def test_user_metric_by_module_path_and_bad_names():
    assert resolve_metric("vlm_bridge.inference.metrics:exact_match") is exact_match
    with pytest.raises(ValueError, match="use one of exact_match, anls"):
        resolve_metric("bleu")
    with pytest.raises(ValueError, match="cannot import it"):
        resolve_metric("no_such_module:f")


def test_a_metric_without_a_score_on_some_answers_is_averaged_over_the_rest(tmp_path, monkeypatch):
    import math

    from vlm_bridge.inference.evaluate import format_report

    (tmp_path / "partial_metric.py").write_text(
        "def some(answer, references):\n    return float('nan') if answer == 'skip' else 1.0\n")
    monkeypatch.chdir(tmp_path)
    rows, means = score_answers(["a", "skip", "b"], [["x"], ["x"], ["x"]], ("partial_metric:some",))
    assert means == {"partial_metric:some": 1.0} and math.isnan(rows[1]["scores"]["partial_metric:some"])
    report = {"samples": 3, "loss_samples": 3, "skipped": {}, "scored": 3, "metrics": means, "answers": rows}
    assert "partial_metric:some 100.0% of 2 answers (nan on 1, left out)" in format_report(report)


def test_a_metric_failing_during_fine_tune_validation_is_named_as_eval_metrics(tmp_path, monkeypatch):
    """A metric that passes its check on the sample answer can still fail on a generated one; in
    fine-tuning the setting is ``eval.metrics``, not ``evaluate``'s ``--metric``."""
    from vlm_bridge.train.config import TrainConfig
    from vlm_bridge.train.validation import Validator

    (tmp_path / "picky.py").write_text("def metric(answer, references):\n"
                                       "    if answer != 'yes':\n        raise KeyError(answer)\n"
                                       "    return 1.0\n")
    (tmp_path / "val.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                        '{"role": "assistant", "content": "a"}]}\n')
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig()
    cfg.data.validation = f"jsonl:{tmp_path / 'val.jsonl'}"
    cfg.eval.generate, cfg.eval.metrics = True, ["picky:metric"]
    monkeypatch.setattr("vlm_bridge.loading.load_processor", lambda folder: None)
    options = Validator(cfg, type("Built", (), {"hf_side_dir": str(tmp_path)})()).options
    with pytest.raises(ValueError, match=r"^eval.metrics picky:metric failed on answer 'no'"):
        score_answers(["no"], [["yes"]], options.metrics, options.metric_option)
    with pytest.raises(ValueError, match=r"^--metric picky:metric failed"):
        score_answers(["no"], [["yes"]], options.metrics)


def test_a_metric_that_calls_sys_exit_is_an_error_not_a_silent_end(tmp_path, monkeypatch):
    """sys.exit() inside a metric ended evaluate and finetune with exit 0 and nothing written."""
    (tmp_path / "quits.py").write_text("import sys\n\ndef metric(answer, references):\n"
                                       "    return 1.0 if answer == 'yes' else sys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^--metric quits:metric failed on answer 'no': SystemExit"):
        score_answers(["no"], [["yes"]], ("quits:metric",))
    # a scoring script that parses its own command line, or exits, when imported
    (tmp_path / "script.py").write_text("import sys\nsys.exit(2)\n\ndef metric(answer, references):\n"
                                        "    return 1.0\n")
    for name in ("script:metric", "script.py:metric"):
        with pytest.raises(ValueError, match=rf"^--metric '{name}': cannot import it \(SystemExit: 2\)"):
            resolve_metric(name)


def test_the_report_counts_truncated_samples_apart_from_skipped_ones():
    """Truncated samples are scored on what fits; counting them as skipped made loss + skipped
    exceed the samples."""
    from vlm_bridge.inference.evaluate import format_report

    report = {"samples": 11, "loss_samples": 8, "skipped": {"too_long": 3, "bad_media": 0}, "truncated": 2}
    assert format_report(report) == "samples        11 (loss on 8; skipped 3; 2 truncated to --seq-len)"
    assert format_report({**report, "truncated": 0}) == "samples        11 (loss on 8; skipped 3)"
