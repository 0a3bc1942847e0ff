"""Per family, at TP=1: logits equal HF's, HF -> Megatron -> HF is bit-exact and loads in
transformers, every parameter belongs to one declared component, and a LoRA adapter on every
component exports as an HF-PEFT adapter that ``peft`` loads with the same logits."""

from __future__ import annotations

import json

import torch
from family_checks import TOL, assert_parity

from vlm_bridge.parallel import ParallelConfig, run_parallel
from vlm_bridge.testing.checks import checkpoint_mismatches

ALL = ("language_model", "vision", "projector")


def test_logits_match_hf(case, parity):
    """Two images of different sizes, a video and a text-only row, left-padded."""
    _, hf = case
    assert_parity(parity(hf, None))


def test_round_trip_bit_exact_and_loadable(case, run_cli, tmp_path):
    from vlm_bridge.loading import load_hf_model, load_processor

    _, hf = case
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", hf, "--megatron-path", meg) == 0
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out) == 0
    assert checkpoint_mismatches(hf, out) == []
    load_hf_model(out)
    load_processor(out)


def _components(hf_dir: str) -> dict:
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import init_distributed

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    prefixes = built.family.components
    owners = {name: [c for c, p in prefixes.items() if name.startswith(p)]
              for name, _ in built.model.named_parameters()}
    return {"owners": owners, "family": built.family.name}


def test_every_parameter_belongs_to_exactly_one_component(case):
    """Freeze flags, per-component learning rates and LoRA components rely on this."""
    family, hf = case
    r = run_parallel(_components, 1, str(hf))
    unowned = {n: o for n, o in r["owners"].items() if len(o) != 1}
    assert not unowned, unowned
    by_component = {c: [n for n, o in r["owners"].items() if o == [c]] for c in ALL}
    assert all(by_component.values()), {c: len(v) for c, v in by_component.items()}
    # The vision tower itself (not only its linears) is vision; nothing under vision. is LM.
    assert all(o != ["language_model"] for n, o in r["owners"].items() if n.startswith("vision."))


def built_components(hf_dir) -> dict:
    from vlm_bridge.loading import load_hf_config
    from vlm_bridge.registry import family_for_config

    return dict(family_for_config(load_hf_config(hf_dir)).components)


def _export_adapter(hf_dir: str, out_dir: str):
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.peft import LoraConfig, apply_lora, export_hf_peft
    from vlm_bridge.peft.lora import randomize_adapters_
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.verify import DEFAULT_PROMPT, default_media, verify_batches

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    built.model.eval()
    wrapped = apply_lora(built.model, LoraConfig(rank=4, alpha=8.0, components=ALL))
    randomize_adapters_(built.model, seed=5, std=0.1)
    export_hf_peft(built, out_dir, hf_dir)
    from vlm_bridge.loading import load_processor

    images, video = default_media()
    logits = [
        pipeline_forward_logits(built.model, built.family.model_inputs(built.settings, dict(batch)))
        for batch in verify_batches(built.family, load_processor(hf_dir), images, video,
                                    DEFAULT_PROMPT)
    ]
    return [x[..., : built.settings.vocab_size] for x in logits], wrapped


def test_lora_on_every_component_exports_as_hf_peft(case, tmp_path):
    from peft import PeftModel

    from vlm_bridge.loading import load_hf_model, load_processor
    from vlm_bridge.verify import DEFAULT_PROMPT, default_media, verify_batches

    family, hf = case
    out = tmp_path / "adapter"
    mg, wrapped = run_parallel(_export_adapter, 1, str(hf), str(out))
    assert {w.split(".")[0] for w in wrapped} == {"language_model", "vision"}
    projector = built_components(hf)["projector"]
    assert any(w.startswith(projector) for w in wrapped), wrapped
    images, video = default_media()
    batches = verify_batches(family, load_processor(hf), images, video, DEFAULT_PROMPT)
    model = PeftModel.from_pretrained(load_hf_model(hf), out).eval()
    for batch, mg_logits in zip(batches, mg, strict=True):
        with torch.no_grad():
            with_adapter = model(**batch).logits
            with model.disable_adapter():
                base = model(**batch).logits
        valid = batch["attention_mask"].bool()
        assert float((with_adapter[valid] - base[valid]).abs().max()) > 1e-2  # the adapter does something
        assert float((with_adapter[valid] - mg_logits[valid]).abs().max()) <= TOL
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf)
