"""Gemma 3 VL specifics beyond the per-family tests (tests/families): the image-bidirectional mask
and the sliding window each matter (so parity does not pass by accident), pan-and-scan crops,
and all four on-disk key layouts round-trip bit-exactly (sharded and single-file, bf16 and fp32)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vlm_bridge.parallel import run_parallel
from vlm_bridge.testing.checks import checkpoint_mismatches, write_hf_weights

TOL = 1e-4


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from vlm_bridge.testing.tiny_gemma3_vl import build_tiny_gemma3_vl

    return build_tiny_gemma3_vl(tmp_path_factory.mktemp("gemma") / "hf")


def _ablations(hf_dir: str) -> dict:
    """Megatron logits as built, without the image spans, and without the sliding window."""
    from vlm_bridge.attention.core import TorchCoreAttention
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.testing.checks import hf_logits, image_batch

    built, batch, kwargs = image_batch(hf_dir)
    vocab = built.settings.vocab_size
    out = {"full": pipeline_forward_logits(built.model, kwargs)[..., :vocab]}
    out["no_spans"] = pipeline_forward_logits(
        built.model, {k: v for k, v in kwargs.items() if k != "token_type_ids"})[..., :vocab]
    windows = [m for m in built.model.modules() if isinstance(m, TorchCoreAttention) and m.window]
    for m in windows:
        m.window = None
    out["no_window"] = pipeline_forward_logits(built.model, kwargs)[..., :vocab]
    out["hf"] = hf_logits(hf_dir, batch)
    out["valid"] = batch["attention_mask"].bool()
    out["tokens"] = int(batch["input_ids"].shape[1])
    out["windowed_layers"] = len(windows)
    return out


def test_image_spans_and_sliding_window_each_change_the_logits(gemma):
    r = run_parallel(_ablations, 1, str(gemma))
    valid = r["valid"]

    def diff(name):
        return float((r[name][valid] - r["hf"][valid]).abs().max())

    assert r["windowed_layers"] == 4 and r["tokens"] > 16  # the window (16) is shorter than the prompt
    assert diff("full") <= TOL
    assert diff("no_spans") > 1e-3, "the image-bidirectional mask had no effect"
    assert diff("no_window") > 1e-3, "the sliding window had no effect"


def test_pan_and_scan_crops_match_hf(gemma, tmp_path, parity):
    """A wide image becomes a thumbnail plus crops (several images in one prompt), a square one
    stays whole; the processor options travel through verify."""
    from vlm_bridge.parallel import ParallelConfig
    from vlm_bridge.testing.media import make_image
    from vlm_bridge.testing.tiny_gemma3_vl import PAN_AND_SCAN_KWARGS
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    paths = []
    for i, (w, h) in enumerate([(168, 56), (56, 56)]):
        paths.append(str(tmp_path / f"{i}.png"))
        make_image(w, h, seed=i).save(paths[-1])
    report = run_parallel(verify, 1, str(gemma), None, ParallelConfig(), paths, None, DEFAULT_PROMPT, None,
                          None, False, dict(PAN_AND_SCAN_KWARGS))
    assert report["max_abs_diff"] <= TOL and report["top1_agreement"] == 1.0, report
    assert report["vision_max_abs_diff"] <= TOL, report
    assert report["tokens"] > 60, report  # 5 image entries of 4 soft tokens each, plus text


def test_bf16_report_places_each_side_against_fp32(gemma):
    """In bf16 with the fp32 reference, verify reports both half-precision models' distance to it:
    logits (KL) and, per decoder layer and for the vision features, an RMS error that shows where
    the error comes from. On the tiny model the two sides are within a few percent of each other."""
    from vlm_bridge.parallel import ParallelConfig
    from vlm_bridge.verify import DEFAULT_PROMPT, format_report, verify

    report = run_parallel(verify, 1, str(gemma), None, ParallelConfig(), [], None, DEFAULT_PROMPT, "bf16",
                          None, True)
    base = report["fp32_baseline"]
    assert report["passed"], format_report(report)
    layers = json.loads((gemma / "config.json").read_text())["text_config"]["num_hidden_layers"]
    errors = base["rms_error_vs_hf_fp32"]
    for side in ("hf_half", "megatron_half"):
        assert len(errors[side]["layers"]) == layers  # the last one after the final norm, as HF has it
        assert all(0 < e < 0.2 for e in errors[side]["layers"]), errors
        assert 0 < errors[side]["vision"] < 0.01, errors
    ratio = [m / h for m, h in zip(errors["megatron_half"]["layers"], errors["hf_half"]["layers"])]
    assert max(ratio) < 1.25 and min(ratio) > 0.8, ratio
    assert "megatron_half RMS error vs fp32" in format_report(report)


LM, VIS, PROJ = "language_model.model.", "vision_tower.vision_model.", "multi_modal_projector."
LAYOUT_PREFIXES = {  # canonical prefix -> file prefix
    "hub": {LM: LM, VIS: VIS, PROJ: PROJ},
    "transformers-4.5x": {LM: "model.language_model.", VIS: "model.vision_tower.vision_model.",
                          PROJ: "model.multi_modal_projector."},
    "transformers-5": {LM: LM, VIS: "vision_tower.", PROJ: PROJ},
    "transformers-5-native": {LM: "model.language_model.", VIS: "model.vision_tower.",
                              PROJ: "model.multi_modal_projector."},
}


def _write_layout(src, dst, layout: str, dtype: torch.dtype, sharded: bool):
    """The tiny checkpoint (saved by transformers 5: flat vision_tower.*) in another layout."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for key, value in load_file(src / "model.safetensors").items():
        canonical = VIS + key[len("vision_tower."):] if key.startswith("vision_tower.") else key
        prefix = next(p for p in LAYOUT_PREFIXES["hub"] if canonical.startswith(p))
        tensors[LAYOUT_PREFIXES[layout][prefix] + canonical[len(prefix):]] = value.to(dtype).contiguous()
    write_hf_weights(tensors, dst, sharded)
    return dst


@pytest.mark.parametrize("layout", list(LAYOUT_PREFIXES))
@pytest.mark.parametrize("dtype,sharded", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-single", "bf16-sharded"])
def test_every_layout_round_trips_bit_exact(gemma, run_cli, tmp_path, layout, dtype, sharded):
    src = _write_layout(gemma, tmp_path / "src", layout, dtype, sharded)
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", src, "--megatron-path", meg) == 0
    assert json.loads((meg / "vlm_bridge.json").read_text())["key_layout"] == layout
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(src, out) == []
    assert not any(k.endswith("lm_head.weight") for k in load_file(next(out.glob("*.safetensors"))))


def test_processor_options_from_the_command_line(gemma, run_cli, tmp_path, capsys):
    from vlm_bridge.testing.media import make_image
    from vlm_bridge.testing.tiny_gemma3_vl import PAN_AND_SCAN_KWARGS

    wide = tmp_path / "wide.png"
    make_image(168, 56, seed=0).save(wide)
    options = [x for k, v in PAN_AND_SCAN_KWARGS.items() for x in ("--processor-arg", f"{k}={json.dumps(v)}")]
    assert run_cli("verify", "--hf-model", gemma, "--image", wide, *options, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] > 40 and report["max_abs_diff"] <= TOL, report
    assert run_cli("verify", "--hf-model", gemma, "--processor-arg", "do_pan_and_scan") == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert run_cli("verify", "--hf-model", gemma, "--video", wide) == 2
    assert "takes no video input" in capsys.readouterr().err


HUB_STYLE_CONFIG = {  # as sparse as google/gemma-3-4b-it's: legacy rope fields, a window pattern
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "boi_token_index": 386, "eoi_token_index": 387, "image_token_index": 388, "eos_token_id": [1, 6],
    "initializer_range": 0.02, "mm_tokens_per_image": 4, "torch_dtype": "float32",
    "transformers_version": "4.50.0.dev0",
    "text_config": {
        "model_type": "gemma3_text", "head_dim": 24, "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_hidden_layers": 6, "num_key_value_heads": 2,
        "query_pre_attn_scalar": 20, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0, "sliding_window": 16,
        "sliding_window_pattern": 3, "vocab_size": 400, "max_position_embeddings": 4096,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 32, "image_size": 56, "intermediate_size": 48,
        "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 14, "vision_use_head": False,
    },
}


def test_a_sparse_hub_config_in_the_hub_layout_imports_and_matches(gemma, tmp_path, run_cli, parity):
    """A folder shaped like the hub upload: sparse config with the legacy rope fields and
    ``sliding_window_pattern`` (read through AutoConfig's defaults), hub key layout."""
    hub = _write_layout(gemma, tmp_path / "hub", "hub", torch.float32, sharded=True)
    (hub / "config.json").write_text(json.dumps(HUB_STYLE_CONFIG, indent=2))
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hub, "--megatron-path", meg) == 0
    report = parity(hub, meg)
    assert report["max_abs_diff"] <= TOL and report["top1_agreement"] == 1.0, report
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(hub, out) == []
    assert json.loads((out / "config.json").read_text())["text_config"]["sliding_window_pattern"] == 3


def test_a_conversation_the_chat_template_rejects_is_named(gemma, run_cli, tmp_path, capsys):
    """Gemma's template raises on roles that do not alternate and reads a system turn as text: one
    error line naming the row, not an internal error."""
    user = {"role": "user", "content": [{"type": "text", "text": "Hi?"}]}
    rows = {"twice.jsonl": [user, user, {"role": "assistant", "content": "Yes."}],
            "system_image.jsonl": [{"role": "system", "content": [{"type": "image", "image": "x.png"}]}, user,
                                   {"role": "assistant", "content": "Yes."}]}
    from vlm_bridge.testing.media import make_image

    make_image(28, 28, seed=0).save(tmp_path / "x.png")
    for name, messages in rows.items():
        data = tmp_path / name
        data.write_text(json.dumps({"messages": messages}) + "\n")
        for args, row in ((["evaluate", "--hf-model", gemma, "--data", data, "--no-generate"], "sample 0"),
                          (["generate", "--hf-model", gemma, "--input", data, "--max-new-tokens", "1"],
                           f"{tmp_path / name} sample 0")):
            capsys.readouterr()
            assert run_cli(*args) == 2, (name, args[0])
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {row}: ") and "\n" not in err, err
            assert "chat template rejected this conversation" in err, err


def test_dora_on_the_projector_with_an_hf_export_is_refused_before_training(gemma, run_cli, capsys, tmp_path):
    """PEFT adapts Gemma's bare projection matrix with plain LoRA only, so the HF-PEFT adapter of a
    DoRA run on the projector cannot be written: said before any step, not after the last."""
    from vlm_bridge.testing.shapes_task import make_task

    train = make_task(tmp_path / "shapes", n_train=4, n_eval=1, size=56)["train"]
    out = tmp_path / "run"
    assert run_cli("finetune", "--recipe", "demo_tiny", "--pretrained", gemma, f"data.train=jsonl:{train}",
                   "steps=1", "global_batch_size=2", "micro_batch_size=1", "peft.method=dora",
                   "peft.components=projector", "checkpoint.export_hf=true", f"output_dir={out}") == 2
    err = capsys.readouterr().err
    assert "DoRA on multi_modal_projector.mm_input_projection_weight has no HF-PEFT adapter form" in err
    assert "step" not in capsys.readouterr().out and not out.exists()
