"""LoRA / DoRA at TP=2 (spawned gloo ranks) equal TP=1: logits, merged logits and the HF-PEFT export."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import ParallelConfig, run_parallel

pytestmark = pytest.mark.slow
VARIANTS = {  # name: (components, use_dora)
    "lora": (("language_model", "vision", "projector"), False),
    "dora": (("language_model",), True),
}


def _build(hf_dir: str, parallel: ParallelConfig):
    from vlm_bridge.convert.engine import build_rank_model, fill_from_hf, load_hf_config
    from vlm_bridge.convert.hf_io import SafetensorsReader
    from vlm_bridge.convert.layout import detect_layout

    reader = SafetensorsReader(hf_dir)
    built = build_rank_model(load_hf_config(hf_dir), torch.float32, parallel)
    fill_from_hf(built, reader, detect_layout(built.family.layouts, reader.keys()), hf_dir)
    built.model.eval()
    return built


def _logits(built, batch):
    from vlm_bridge.runtime import last_stage_rank, pipeline_forward_logits, to_rank0

    logits = pipeline_forward_logits(built.model, built.family.prepare_inputs(built.settings, dict(batch)))
    vocab = built.settings.vocab_size
    return to_rank0(logits[..., :vocab] if logits is not None else None, last_stage_rank())


def _run(hf_dir: str, out_dir: str, tp: int) -> dict:
    """Per variant: adapter logits, merged logits; the adapter is exported to ``out_dir/<variant>``."""
    from transformers import AutoProcessor

    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.peft import LoraConfig, apply_lora, export_hf_peft, merge_lora
    from vlm_bridge.peft.lora import randomize_adapters_
    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    parallel = ParallelConfig(tp=tp)
    init_distributed(parallel)
    images, video = default_media()
    processor = AutoProcessor.from_pretrained(hf_dir, local_files_only=True)
    batch = build_batch(processor, images, video, DEFAULT_PROMPT)
    result = {}
    for name, (components, use_dora) in VARIANTS.items():
        built = _build(hf_dir, parallel)
        apply_lora(built.model, LoraConfig(rank=4, alpha=8.0, components=components, use_dora=use_dora))
        randomize_adapters_(built.model, seed=11, std=0.1)
        export_hf_peft(built, f"{out_dir}/{name}", hf_dir)
        adapter = _logits(built, batch)
        merge_lora(built.model)
        result[name] = (adapter, _logits(built, batch))
    return result


def test_tp2_adapters_equal_tp1(tiny_hf, tmp_path):
    from safetensors.torch import load_file

    one = run_parallel(_run, 1, str(tiny_hf), str(tmp_path / "tp1"), 1)
    two = run_parallel(_run, 2, str(tiny_hf), str(tmp_path / "tp2"), 2)
    for name in VARIANTS:
        (a1, m1), (a2, m2) = one[name], two[name]
        assert float((a1 - a2).abs().max()) <= 1e-4, name
        assert float((m2 - a2).abs().max()) <= 1e-4, name  # merge at TP=2 (DoRA: all-reduced norms)
        e1 = load_file(tmp_path / "tp1" / name / "adapter_model.safetensors")
        e2 = load_file(tmp_path / "tp2" / name / "adapter_model.safetensors")
        assert sorted(e1) == sorted(e2)
        for key in e1:
            if key.endswith("lora_magnitude_vector"):  # initial row norms: summation order differs
                assert torch.allclose(e1[key], e2[key], rtol=1e-6, atol=0), key
            else:
                assert torch.equal(e1[key], e2[key]), key
        cfg1 = (tmp_path / "tp1" / name / "adapter_config.json").read_text()
        assert cfg1 == (tmp_path / "tp2" / name / "adapter_config.json").read_text()
