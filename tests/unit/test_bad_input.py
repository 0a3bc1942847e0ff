"""Bad input: a one-line error naming the problem, exit code 2, and nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def check_error(run_cli, capsys, args, *needles: str, out: Path) -> str:
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists(), "partial output left behind"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == [], leftovers
    return err


def import_args(hf: Path, out: Path, *extra: str) -> list:
    return ["import", "--hf-model", hf, "--megatron-path", out, *extra]


def test_unknown_architecture(tiny_hf, run_cli, capsys, tmp_path):
    bad = copy_model(tiny_hf, tmp_path / "llama")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300}
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "LlamaForCausalLM",
                "Qwen2_5_VLForConditionalGeneration", out=out)


def test_an_mrope_section_that_does_not_fit_the_head_is_named_at_import(tiny_hf, run_cli, capsys, tmp_path):
    bad = copy_model(tiny_hf, tmp_path / "mrope")
    cfg = json.loads((bad / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope["mrope_section"] = [s + 1 for s in rope.get("mrope_section", [1, 1, 1])]
    text["rope_parameters" if "rope_parameters" in text else "rope_scaling"] = rope
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "mrope_section", "rotary channels", out=out)


def _flattened(hf: Path, to: Path) -> Path:
    """The folder with its text settings moved to the config's top level (an older hub form)."""
    flat = copy_model(hf, to)
    cfg = json.loads((flat / "config.json").read_text())
    text = cfg.pop("text_config")
    cfg.update({k: v for k, v in text.items() if k != "model_type"})
    (flat / "config.json").write_text(json.dumps(cfg))
    return flat


def test_language_settings_a_config_class_ignores_at_the_top_level_are_named(tiny_hf, tiny_qwen3, run_cli,
                                                                              capsys, tmp_path):
    """Qwen3-VL's config class keeps text_config's defaults (a 4096-wide, 32-layer model) when the
    sizes stand at the top level: every tensor then mismatched. Qwen2.5-VL's class moves them."""
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(_flattened(tiny_qwen3, tmp_path / "q3"), out),
                "config.json: hidden_size=", "num_hidden_layers=", 'belong under "text_config"',
                "would have hidden_size=4096", out=out)
    for kept in ({}, None, {"model_type": "qwen3_vl_text", "vocab_size": 300}):  # empty, null, partial
        flat = _flattened(tiny_qwen3, tmp_path / f"q3_{len(kept or '')}_{kept is None}")
        cfg = json.loads((flat / "config.json").read_text())
        (flat / "config.json").write_text(json.dumps({**cfg, "text_config": kept}))
        check_error(run_cli, capsys, import_args(flat, out), "hidden_size=", 'belong under "text_config"',
                    out=out)
    assert run_cli(*import_args(_flattened(tiny_hf, tmp_path / "q25"), out)) == 0


def test_folder_with_its_own_model_code_is_refused_without_a_prompt(tiny_hf, run_cli, capsys, tmp_path,
                                                                    monkeypatch):
    """A hub folder whose config needs its own Python code (``auto_map``) and that no family reads
    natively gets one line; transformers is never asked to run or prompt."""
    bad = copy_model(tiny_hf, tmp_path / "remote")
    cfg = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
           "auto_map": {"AutoConfig": "configuration.Config", "AutoModel": "modeling.Model"}}
    (bad / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted on the terminal"))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "config.json", "auto_map", "InternVLChatModel",
                "NemotronH_Nano_VL_V2", out=out)


def test_missing_tensor(tiny_hf, run_cli, capsys, tmp_path):
    bad = copy_model(tiny_hf, tmp_path / "m")
    edit_tensors(bad, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "missing", "model.layers.1.self_attn.k_proj.bias",
                out=out)


def test_extra_tensor(tiny_hf, run_cli, capsys, tmp_path):
    import torch

    bad = copy_model(tiny_hf, tmp_path / "m")
    edit_tensors(bad, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    out = tmp_path / "out"
    args = import_args(bad, out)
    check_error(run_cli, capsys, args, "unexpected", "model.layers.0.mystery.weight", out=out)


def test_wrong_shape(tiny_hf, run_cli, capsys, tmp_path):
    import torch

    bad = copy_model(tiny_hf, tmp_path / "m")
    edit_tensors(bad, lambda t: t.__setitem__("model.layers.3.mlp.down_proj.weight", torch.zeros(64, 100)))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "model.layers.3.mlp.down_proj.weight", "(64, 100)",
                out=out)


def test_truncated_safetensors(tiny_hf, run_cli, capsys, tmp_path):
    bad = copy_model(tiny_hf, tmp_path / "m")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "model.safetensors", "truncated", out=out)


def test_corrupt_header(tiny_hf, run_cli, capsys, tmp_path):
    bad = copy_model(tiny_hf, tmp_path / "m")
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(bad, out), "model.safetensors", out=out)


@pytest.mark.parametrize(
    "flags,needle",
    [(["--tp", "3"], "--tp 3 does not divide"), (["--pp", "3"], "--pp 3 does not divide the language layers"),
     (["--tp", "0"], "--tp must be >= 1")],
)
def test_layout_that_does_not_divide(tiny_hf, run_cli, capsys, tmp_path, flags, needle):
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(tiny_hf, out, *flags), needle, out=out)


def test_not_an_hf_folder(run_cli, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(empty, out), "config.json", out=out)


def test_existing_output_needs_overwrite(tiny_hf, tiny_megatron, run_cli, capsys, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    capsys.readouterr()
    assert run_cli(*import_args(tiny_hf, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert run_cli("export", "--megatron-path", tiny_megatron, "--hf-path", out) == 2
    assert (out / "keep.txt").exists()
    assert run_cli("export", "--megatron-path", tiny_megatron, "--hf-path", out, "--overwrite") == 0
    # --overwrite replaces what the export writes (and any old weights); the user's file stays
    assert (out / "keep.txt").read_text() == "user data" and (out / "model.safetensors").exists()


def test_export_of_a_non_checkpoint(tiny_hf, run_cli, capsys, tmp_path):
    out = tmp_path / "out"
    check_error(run_cli, capsys, ["export", "--megatron-path", tiny_hf, "--hf-path", out],
                "vlm_bridge.json", out=out)


def test_verify_with_unreadable_image(tiny_hf, run_cli, capsys, tmp_path):
    img = tmp_path / "broken.png"
    img.write_bytes(b"not a png")
    capsys.readouterr()
    assert run_cli("verify", "--hf-model", tiny_hf, "--image", img) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.png" in err and "\n" not in err


def test_an_output_over_its_own_input_is_refused_even_with_overwrite(tiny_hf, tiny_megatron, run_cli, capsys,
                                                                      tmp_path):
    hf = copy_model(tiny_hf, tmp_path / "hf")
    meg = copy_model(tiny_megatron, tmp_path / "meg")
    held = tmp_path / "held"
    copy_model(tiny_hf, held / "hf")
    refused = [
        import_args(hf, hf, "--overwrite"),
        import_args(held / "hf", held, "--overwrite"),  # the output folder holds the input
        ["export", "--megatron-path", meg, "--hf-path", meg, "--overwrite"],
    ]
    for args in refused:
        capsys.readouterr()
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: the output") and "input" in err and "\n" not in err, err
    assert (hf / "model.safetensors").is_file() and (held / "hf" / "model.safetensors").is_file()
    assert (meg / "vlm_bridge.json").is_file()
    answers = tmp_path / "prompts.jsonl"
    answers.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    capsys.readouterr()
    assert run_cli("generate", "--hf-model", hf, "--input", answers, "--output", answers) == 2
    assert "--input" in capsys.readouterr().err and "hi" in answers.read_text()
    # a data source spec names its file too; a file inside an input folder is part of that input
    assert run_cli("evaluate", "--hf-model", hf, "--data", f"jsonl:{answers}", "--report", answers) == 2
    assert "the input --data" in capsys.readouterr().err and "hi" in answers.read_text()
    metadata = meg / "vlm_bridge.json"
    before = metadata.read_text()
    assert run_cli("generate", "--megatron-path", meg, "--input", answers, "--output", metadata,
                   "--overwrite") == 2
    assert "is a file of the input --megatron-path" in capsys.readouterr().err
    assert metadata.read_text() == before
    # an existing output file is replaced only with --overwrite
    earlier = tmp_path / "earlier.json"
    earlier.write_text("keep")
    assert run_cli("evaluate", "--hf-model", hf, "--data", answers, "--report", earlier) == 2
    assert "--report" in capsys.readouterr().err and earlier.read_text() == "keep"
    assert run_cli("generate", "--hf-model", hf, "--input", answers, "--output", earlier) == 2
    assert "pass --overwrite" in capsys.readouterr().err and earlier.read_text() == "keep"


def test_export_overwrite_keeps_the_folders_own_files(tiny_megatron, run_cli, tmp_path):
    """A cloned model repository exported into: its README and .git stay, old weights go."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "README.md").write_text("card")
    (repo / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    assert run_cli("export", "--megatron-path", tiny_megatron, "--hf-path", repo, "--overwrite") == 0
    names = {p.name for p in repo.iterdir()}
    assert {".git", "README.md", "config.json", "model.safetensors"} <= names
    assert "model-00001-of-00009.safetensors" not in names and (repo / "README.md").read_text() == "card"


def test_verify_against_a_checkpoint_of_another_model_names_the_difference(tiny_hf, tiny_megatron,
                                                                           tiny_qwen3, run_cli, capsys,
                                                                           tmp_path):
    meg = copy_model(tiny_megatron, tmp_path / "meg")
    config = json.loads((meg / "hf" / "config.json").read_text())
    config["vision_config"]["depth"] += 1
    (meg / "hf" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run_cli("verify", "--hf-model", tiny_hf, "--megatron-path", meg) == 2
    err = capsys.readouterr().err.strip()
    assert "vision_config.depth" in err and "not a conversion" in err and "\n" not in err, err
    shutil.copy(tiny_qwen3 / "config.json", meg / "hf" / "config.json")
    assert run_cli("verify", "--hf-model", tiny_hf, "--megatron-path", meg) == 2
    assert "qwen3" in capsys.readouterr().err


def test_export_shard_size_is_checked_by_its_option_name(tiny_megatron, run_cli, capsys, tmp_path):
    out = tmp_path / "out"
    check_error(run_cli, capsys, ["export", "--megatron-path", tiny_megatron, "--hf-path", out,
                                  "--max-shard-size-gb", "-1"], "--max-shard-size-gb", out=out)
    check_error(run_cli, capsys, ["export", "--megatron-path", tiny_megatron, "--hf-path", out,
                                  "--expert-layout", "fused_hub"], "--expert-layout applies to MoE models",
                out=out)


def test_chat_template_kept_with_the_tokenizer_is_used_and_none_is_named(tiny_hf, tmp_path):
    from vlm_bridge.convert.hf_io import CheckpointError
    from vlm_bridge.loading import load_processor

    old = copy_model(tiny_hf, tmp_path / "old")  # saved before processors had templates of their own
    template = (old / "chat_template.jinja").read_text()
    (old / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": template}))
    assert load_processor(old).chat_template == template
    (old / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(CheckpointError, match="no chat template"):
        load_processor(old)


def test_a_truncated_checkpoint_file_is_one_line_naming_it(tiny_megatron, run_cli, capsys, tmp_path):
    meg = copy_model(tiny_megatron, tmp_path / "meg")
    largest = max((meg / "weights").glob("*.distcp"), key=lambda f: f.stat().st_size)
    with largest.open("r+b") as fh:
        fh.truncate(1000)
    out = tmp_path / "out"
    check_error(run_cli, capsys, ["export", "--megatron-path", meg, "--hf-path", out],
                "cannot read this checkpoint", str(meg / "weights"), out=out)


def test_finetune_failing_before_its_first_step_leaves_no_run_folder(tiny_hf, run_cli, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    sample = {"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"},
                                                        {"type": "text", "text": "What?"}]},
                           {"role": "assistant", "content": "Red."}]}
    data.write_text(json.dumps(sample) + "\n")
    out = tmp_path / "run"
    err = check_error(run_cli, capsys, ["finetune", "--recipe", "demo_tiny", "--pretrained", tiny_hf,
                                        f"data.train=jsonl:{data}", f"output_dir={out}", "steps=1",
                                        "global_batch_size=1", "micro_batch_size=1"],
                      "missing.png", out=out)
    assert "training sample 0" in err
    assert err.endswith("; data.skip_bad_media=true skips such samples (and counts them)"), err
    # a run folder that existed (a run being resumed) is left exactly as it was
    out.mkdir()
    (out / "config.json").write_text('{"optim": {"lr": 0.003}}')
    assert run_cli("finetune", "--recipe", "demo_tiny", "--pretrained", tiny_hf, f"data.train=jsonl:{data}",
                   f"output_dir={out}", "steps=1", "global_batch_size=1", "micro_batch_size=1",
                   "optim.lr=0.5") == 2
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == '{"optim": {"lr": 0.003}}'


@pytest.mark.parametrize("args, needle", [
    (["import", "--hf-model", "a", "--megatron-path", "b", "--tp", "x"],
     "argument --tp: invalid int value: 'x'"),
    (["verify"], "the following arguments are required: --hf-model"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_command_line_mistakes_are_one_line_too(args, needle, capsys):
    from vlm_bridge.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: vlm-bridge") and "\n" not in err, err
    assert needle in err and "--help" in err, err


@pytest.mark.parametrize("text, needle", [('{"family": "qwen2_5_vl"}', "no dtype, key_layout"),
                                          ('{"family": "qwen2_5_vl",\n', "not readable JSON")])
def test_an_edited_checkpoint_metadata_file_is_named(tiny_megatron, run_cli, capsys, tmp_path, text, needle):
    meg = copy_model(tiny_megatron, tmp_path / "meg")
    (meg / "vlm_bridge.json").write_text(text)
    out = tmp_path / "out"
    check_error(run_cli, capsys, ["export", "--megatron-path", meg, "--hf-path", out],
                str(meg / "vlm_bridge.json"), needle, out=out)


def test_a_hub_cache_repository_folder_points_to_its_snapshot(tiny_hf, run_cli, capsys, tmp_path):
    """huggingface_hub's cache: models--org--name/snapshots/<revision>/ holds the files. Without
    refs/main, its only snapshot is read; of two, neither is guessed."""
    repo = tmp_path / "models--org--tiny"
    copy_model(tiny_hf, repo / "snapshots" / ("a" * 40))
    assert run_cli(*import_args(repo, tmp_path / "one")) == 0
    copy_model(tiny_hf, repo / "snapshots" / ("b" * 40))
    out = tmp_path / "out"
    check_error(run_cli, capsys, import_args(repo, out), "no config.json", "hub cache folder",
                str(repo / "snapshots" / ("b" * 40)), out=out)


def test_overwrite_replaces_only_its_own_kind_of_folder(tiny_hf, tiny_megatron, run_cli, capsys, tmp_path):
    """An HF export does not overwrite a Megatron checkpoint nor an import an HF model folder (each
    would leave the other's files beside its own); an adapter's config goes with its weights."""
    meg, hf = copy_model(tiny_megatron, tmp_path / "meg"), copy_model(tiny_hf, tmp_path / "hf")
    capsys.readouterr()
    assert run_cli("export", "--megatron-path", tiny_megatron, "--hf-path", meg, "--overwrite") == 2
    assert "is a vlm-bridge Megatron checkpoint" in capsys.readouterr().err
    assert run_cli(*import_args(tiny_hf, hf, "--overwrite")) == 2
    assert "is a Hugging Face model folder" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert run_cli("export", "--megatron-path", tiny_megatron, "--hf-path", adapter, "--overwrite") == 0
    assert not (adapter / "adapter_config.json").exists() and (adapter / "model.safetensors").is_file()


def test_finetune_overrides_may_come_between_options(tiny_hf, run_cli, capsys, tmp_path):
    capsys.readouterr()
    assert run_cli("finetune", "--recipe", "demo_tiny", "optim.lr=1e-3", "--pretrained", tiny_hf,
                   "no.such_key=1") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'no.such_key'" in err and "unrecognized" not in err, err
    assert run_cli("finetune", "--recipe", "demo_tiny", "--pretrained", tiny_hf, "--steps", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: vlm-bridge finetune: unrecognized arguments: --steps; config settings are "
                   "key=value overrides (e.g. steps=...) (see vlm-bridge finetune --help)"), err


def test_finetune_and_export_refuse_what_would_be_ignored_or_destroyed(tiny_hf, tiny_megatron, run_cli,
                                                                      capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Yes."}]}) + "\n")
    base = ["finetune", "--recipe", "demo_tiny", "--pretrained", tiny_hf, f"data.train={data}"]
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert run_cli(*base, "--dp", "0") == 2
    assert run_cli(*base, f"pretrained={tiny_megatron}") == 2
    assert run_cli(*base, f"output_dir={tmp_path / 'afile'}") == 2
    assert run_cli("export", "--megatron-path", tiny_megatron, "--hf-path", Path(tiny_megatron) / "hf",
                   "--overwrite") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4, errors
    assert errors[0] == "error: --dp must be >= 1, got 0"
    assert errors[1].startswith("error: pretrained=") and "is --pretrained" in errors[1]
    assert errors[2].endswith("afile is a file; the run writes a folder there")
    assert "is the checkpoint's own hf/ folder" in errors[3]
    side = Path(tiny_megatron) / "hf"
    assert (side / "config.json").is_file() and not list(side.glob("*.safetensors"))


def test_moe_fine_tuning_at_tensor_parallel_two_is_named(tiny_qwen3_moe, run_cli, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Yes."}]}) + "\n")
    out = tmp_path / "run"
    args = ["finetune", "--recipe", "demo_tiny", "--pretrained", tiny_qwen3_moe, f"data.train=jsonl:{data}",
            f"output_dir={out}", "steps=1", "parallel.tp=2"]
    check_error(run_cli, capsys, args, "parallel.tp=2", "parallel.ep", out=out)


@pytest.mark.parametrize("args, needle", [
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "--prompt", "hi", "--seed", str(10**23)], "--seed must be in"),
    (["generate", "--prompt", "hi", "--max-new-tokens", str(10**11)], "more than the model's 4096 positions"),
    (["verify", "--tolerance", "nan"], "--tolerance must be a finite number"),
    (["evaluate", "--data", "DATA", "--max-samples", "-1"], "--max-samples must be >= 1"),
    (["evaluate", "--data", "DATA", "--metric", "./nowhere.py:f"], "cannot import it"),
    (["evaluate", "--data", "DATA", "--metric", "os:path"], "path is a module, not a function"),
    (["evaluate", "--data", "DATA", "--no-generate", "--metric", "anls"], "--no-generate makes none"),
    (["evaluate", "--data", "DATA", "--metric", "os:getcwd"], "--metric os:getcwd failed on answer 'yes'"),
    (["evaluate", "--data", "DATA", "--metric", "math:exp"], "--metric math:exp failed on answer 'yes'"),
    (["evaluate", "--data", "DATA", "--metric", "operator:add"], "failed on answer 'yes'"),
])
def test_decoding_and_report_options_are_checked_first(tiny_hf, run_cli, capsys, tmp_path, args, needle):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Yes."}]}) + "\n")
    capsys.readouterr()
    assert run_cli(*[str(data) if a == "DATA" else a for a in args], "--hf-model", tiny_hf) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_a_metric_from_a_file_and_a_nan_score_give_strict_json(tiny_hf, run_cli, capsys, tmp_path):
    metrics = tmp_path / "my_metrics.py"
    metrics.write_text("def half(answer, references):\n    return 0.5\n\ndef nan(answer, references):\n"
                       "    return float('nan')\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Yes."}]}) + "\n")
    report = tmp_path / "r.json"
    assert run_cli("evaluate", "--hf-model", tiny_hf, "--data", data, "--metric", f"{metrics}:half",
                   "--metric", f"{metrics}:nan", "--max-new-tokens", "1", "--report", report) == 0
    scores = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert scores["metrics"][f"{metrics}:half"] == 0.5 and scores["metrics"][f"{metrics}:nan"] is None
    assert "no score: the metric gave nan on all 1 answers" in capsys.readouterr().out
    # a score outside [0, 1] (a percentage, say) is refused before any model loads
    metrics.write_text("def percent(answer, references):\n    return 100.0\n")
    assert run_cli("evaluate", "--hf-model", tiny_hf, "--data", data, "--metric", f"{metrics}:percent") == 2
    assert "gave 100.0 for answer 'yes'; a score must be in [0, 1]" in capsys.readouterr().err


def test_swapped_or_missing_model_folders_say_which_option_they_belong_to(tiny_hf, tiny_megatron, run_cli,
                                                                         capsys, tmp_path):
    capsys.readouterr()
    assert run_cli("import", "--megatron-path", tiny_hf, "--hf-model", tmp_path / "m1") == 2
    assert run_cli("verify", "--hf-model", tiny_megatron) == 2
    assert run_cli("export", "--megatron-path", tiny_hf, "--hf-path", tmp_path / "out") == 2
    assert run_cli("export", "--megatron-path", tmp_path / "nope", "--hf-path", tmp_path / "out") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].endswith("m1: no such folder (a Hugging Face model folder was expected)"), errors
    assert errors[1].endswith("pass it as --megatron-path"), errors
    assert errors[2].endswith("it is a Hugging Face model folder: run vlm-bridge import on it first"), errors
    assert errors[3].endswith("nope: no such folder (a vlm-bridge Megatron checkpoint was expected)"), errors
    assert not (tmp_path / "out").exists()


def test_a_seq_len_past_the_models_positions_is_refused_before_loading(tiny_hf, tiny_megatron, run_cli,
                                                                      capsys, tmp_path):
    """Packing fills every row to data.seq_len; past the model's positions that is not a sample
    the model can take (and on a CPU the rows' masks grew until the run was killed)."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    out = tmp_path / "run"
    for pretrained in (tiny_hf, tiny_megatron):
        check_error(run_cli, capsys, ["finetune", "--recipe", "demo_tiny", "--pretrained", pretrained,
                                      f"data.train={data}", f"output_dir={out}", "data.seq_len=100000"],
                    "data.seq_len=100000 is more than the model's 4096 positions", out=out)


def test_a_megatron_lm_checkpoint_is_named_as_one(run_cli, capsys, tmp_path):
    """A Megatron-LM / Megatron Bridge save (its tracker file, iter_* folders of its own layout)
    is not read; the message says what it is and the way through HF."""
    run = tmp_path / "mbridge_run"
    (run / "iter_0000010").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("10")
    (run / "iter_0000010" / "run_config.yaml").write_text("model: {}\n")
    capsys.readouterr()
    assert run_cli("export", "--megatron-path", run, "--hf-path", tmp_path / "out") == 2
    assert run_cli("verify", "--megatron-path", run / "iter_0000010", "--hf-model", run) == 2
    assert run_cli("finetune", "--recipe", "demo_tiny", "--pretrained", run,
                   f"output_dir={tmp_path / 'ft'}") == 2
    assert run_cli("import", "--hf-model", run, "--megatron-path", tmp_path / "out") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4, errors
    assert all("it is a Megatron-LM / Megatron Bridge checkpoint" in e for e in errors), errors
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()
