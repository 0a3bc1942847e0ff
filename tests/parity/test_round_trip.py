"""HF -> Megatron -> HF is bit-exact: same keys, dtypes and tensors, in every accepted layout."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from vlm_bridge.convert.hf_io import SafetensorsReader
from vlm_bridge.testing.checks import checkpoint_mismatches


def round_trip(run_cli, hf, tmp_path, *extra_import) -> None:
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hf, "--megatron-path", meg, *extra_import) == 0
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(hf, out) == []
    return out


def test_round_trip_legacy_layout(tiny_hf, run_cli, tmp_path):
    """Checkpoints written by transformers 4.52-4.57 (model.language_model.*, model.visual.*)."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in tiny_hf.iterdir():
        if f.suffix != ".safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_hf / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    out = round_trip(run_cli, legacy, tmp_path / "rt")
    assert any(k.startswith("model.language_model.") for k in SafetensorsReader(out).keys())


def test_round_trip_sharded_input_and_output(tiny_hf, run_cli, tmp_path):
    """Sharded safetensors with an index in, several shards out (small shard size)."""
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "sharded"
    model = AutoModelForImageTextToText.from_pretrained(tiny_hf)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (tiny_hf / name).exists():
            (sharded / name).write_bytes((tiny_hf / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", sharded, "--megatron-path", meg) == 0
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out, "--max-shard-size-gb", "0.0001") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert checkpoint_mismatches(sharded, out) == []


def test_bf16_checkpoint_round_trip(tiny_hf, run_cli, tmp_path):
    """A bf16 checkpoint stays bf16 and bit-exact; --dtype converts on export."""
    from transformers import AutoModelForImageTextToText

    bf16 = tmp_path / "bf16"
    AutoModelForImageTextToText.from_pretrained(tiny_hf, dtype=torch.bfloat16).save_pretrained(bf16)
    out = round_trip(run_cli, bf16, tmp_path / "rt")
    assert SafetensorsReader(out).dtype("model.norm.weight") == torch.bfloat16
    fp32 = tmp_path / "fp32"
    meg = tmp_path / "rt" / "meg"
    assert run_cli("export", "--megatron-path", meg, "--hf-path", fp32, "--dtype", "fp32") == 0
    assert SafetensorsReader(fp32).dtype("model.norm.weight") == torch.float32
    assert json.loads((fp32 / "config.json").read_text()).get("dtype") in (None, "float32")
