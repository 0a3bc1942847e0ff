"""``vlm-bridge evaluate`` computes the trainer's loss; validation during fine-tuning logs loss and
answer metrics; a LoRA training run generates (adapters merged on the fly) exactly what its HF
export generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_train


@pytest.fixture(scope="session")
def four_samples(shapes_data) -> Path:
    """The first four held-out conversations (next to the images their paths are relative to)."""
    folder = Path(shapes_data["eval"]).parent
    path = folder / "four.jsonl"
    path.write_text("".join(Path(shapes_data["eval"]).read_text().splitlines(keepends=True)[:4]))
    return path


def _evaluate(run_cli, source: list, data: Path, report: Path, *extra) -> dict:
    assert run_cli("evaluate", *source, "--data", data, "--report", report, *extra) == 0
    return json.loads(report.read_text())


def test_evaluate_loss_equals_the_trainers_first_step_loss(tiny_cfg, tiny_hf, four_samples, run_cli,
                                                           tmp_path):
    # One step over exactly these four samples (no packing: one sample per row); its loss is
    # computed before the update, on the pretrained weights.
    cfg = tiny_cfg(**{"data.train": f"jsonl:{four_samples}", "data.pack": "false", "steps": 1,
                      "data.shuffle": "false"})
    first = run_train(cfg)["losses"][0]
    report = _evaluate(run_cli, ["--hf-model", tiny_hf], four_samples, tmp_path / "r.json", "--no-generate")
    assert report["loss_samples"] == 4 and report["loss_tokens"] > 0
    assert report["loss"] == pytest.approx(first, rel=1e-6, abs=1e-6)
    assert report["perplexity"] == pytest.approx(2.718281828 ** first, rel=1e-5)
    assert "answers" not in report


def test_lora_run_validates_then_generates_and_evaluates_like_its_export(tiny_cfg, four_samples, run_cli,
                                                                        tmp_path):
    cfg = tiny_cfg(**{"peft.method": "lora", "optim.lr": "5e-3", "steps": 4, "eval.every": 2,
                      "eval.generate": "true", "eval.metrics": "exact_match,anls",
                      "data.validation": f"jsonl:{four_samples}", "checkpoint.export_hf": "true",
                      "tensorboard": "true"})
    result = run_train(cfg)
    assert [v["step"] for v in result["validation"]] == [2, 4]
    for v in result["validation"]:
        assert v["loss_tokens"] > 0 and set(v["metrics"]) == {"exact_match", "anls"} and v["scored"] == 4
    run_dir = Path(cfg.output_dir)
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").glob("events.*"))
    assert b"val/loss" in events and b"val/exact_match" in events and (run_dir / "loss.png").is_file()

    # The run folder resolves to its newest checkpoint; adapters are merged on load.
    mine = _evaluate(run_cli, ["--megatron-path", run_dir], four_samples, tmp_path / "a.json")
    assert mine["loss"] == pytest.approx(result["validation"][-1]["loss"], rel=1e-5)
    export = run_dir / "checkpoints" / "iter_0000004" / "hf_export"
    theirs = _evaluate(run_cli, ["--hf-model", export], four_samples, tmp_path / "b.json")
    assert [a["answer"] for a in mine["answers"]] == [a["answer"] for a in theirs["answers"]]
    assert mine["metrics"] == theirs["metrics"] == result["validation"][-1]["metrics"]


@pytest.mark.parametrize("steps", [1, 3], ids=["last_validation", "first_of_three_unsaved"])
def test_a_metric_failing_at_validation_keeps_the_weights_trained_so_far(tiny_cfg, four_samples, steps,
                                                                        tmp_path, monkeypatch):
    """The last validation runs after the final save; an earlier one, at a step no save was asked
    for, saves before the error goes on. A user's metric that passes its check on the sample answer
    and fails on a generated one is named as eval.metrics, and the weights stay."""
    (tmp_path / "picky_metric.py").write_text("def metric(answer, references):\n"
                                              "    if answer != 'yes':\n        raise KeyError(answer)\n"
                                              "    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(**{"steps": steps, "data.validation": f"jsonl:{four_samples}", "eval.generate": "true",
                      "eval.metrics": "picky_metric:metric", "eval.max_new_tokens": 2, "eval.every": 1,
                      "checkpoint.save_every": 0})
    with pytest.raises(Exception, match="eval.metrics picky_metric:metric failed on answer"):
        run_train(cfg)
    assert (Path(cfg.output_dir) / "checkpoints" / "iter_0000001" / "weights").is_dir()


def test_a_run_folder_fine_tunes_from_its_newest_checkpoint(tiny_cfg, tmp_path):
    """``--pretrained`` takes a finished run's folder as verify, export and evaluate do (its own
    config.json is the run's: it was read as a model's, 'unsupported architecture None')."""
    first = tiny_cfg(steps=2)
    run_train(first)
    again = tiny_cfg(steps=1, output_dir=str(tmp_path / "again"))
    again.pretrained = first.output_dir
    assert len(run_train(again)["losses"]) == 1


def test_a_new_lora_run_starts_from_an_earlier_lora_runs_merged_model(tiny_cfg, tmp_path):
    """An earlier LoRA run's adapters are folded into the base weights, and the new adapters start
    at B = 0 on top: the first loss (taken before any update) equals full fine-tuning's from the
    same folder. It was refused ('the model already has LoRA adapters')."""
    earlier = tiny_cfg(**{"peft.method": "lora", "optim.lr": "5e-3", "steps": 2})
    run_train(earlier)
    first_losses = []
    for name, method in (("sft", None), ("lora", "lora"), ("dora", "dora")):
        peft = {"peft.method": method} if method else {}
        cfg = tiny_cfg(steps=1, output_dir=str(tmp_path / name), **peft)
        cfg.pretrained = earlier.output_dir
        first_losses.append(run_train(cfg)["losses"][0])
    assert first_losses[1] == pytest.approx(first_losses[0], rel=1e-6)
    assert first_losses[2] == pytest.approx(first_losses[0], rel=1e-6)


def test_evaluate_refuses_bad_input(run_cli, tiny_hf, four_samples, tmp_path, capfd):
    assert run_cli("evaluate", "--hf-model", tiny_hf, "--data", tmp_path / "none.jsonl") == 2
    assert run_cli("evaluate", "--hf-model", tiny_hf, "--data", four_samples, "--metric", "bleu") == 2
    errors = capfd.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "none.jsonl: no such file or folder" in errors[0]
    assert "use one of" in errors[1]
