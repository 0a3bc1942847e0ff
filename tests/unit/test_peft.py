"""LoRA / DoRA on a built Megatron model: freezing, no-op init, merge/unmerge, HF-PEFT export parity."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_bridge.parallel import ParallelConfig, run_parallel

TOL = 1e-4
ALL = ("language_model", "vision", "projector")


def build(hf_dir: str, parallel: ParallelConfig):
    """This rank's fp32 model filled from the HF checkpoint (as verify.py does)."""
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import init_distributed

    init_distributed(parallel)
    built = load_hf(hf_dir, parallel, torch.float32)
    built.model.eval()
    return built


def make_batch(hf_dir: str):
    from transformers import AutoProcessor

    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    images, video = default_media()
    processor = AutoProcessor.from_pretrained(hf_dir, local_files_only=True)
    return build_batch(processor, images, video, DEFAULT_PROMPT)


def megatron_logits(built, batch) -> torch.Tensor | None:
    """Logits ``[b, s, vocab]`` on rank 0 (CPU), ``None`` elsewhere."""
    from vlm_bridge.runtime import last_stage_rank, pipeline_forward_logits, to_rank0

    kwargs = built.family.model_inputs(built.settings, dict(batch))
    logits = pipeline_forward_logits(built.model, kwargs)
    vocab = built.settings.vocab_size
    return to_rank0(logits[..., :vocab] if logits is not None else None, last_stage_rank())


def hf_peft_logits(hf_dir: str, adapter_dir: str, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stock HF model + the exported adapter through ``peft``: logits with and without the adapter
    and peft's adapter state dict."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, local_files_only=True)
    model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    return logits, base, get_peft_model_state_dict(model)


# --- functions run on the (single, in-process) rank ------------------------------------------


def _freeze_and_noop(hf_dir: str) -> dict:
    from vlm_bridge.peft import LoraConfig, adapter_state_dict, apply_lora

    built = build(hf_dir, ParallelConfig())
    batch = make_batch(hf_dir)
    base = megatron_logits(built, batch)
    names = apply_lora(built.model, LoraConfig(rank=4, components=ALL))
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    adapters = {n for n, _ in built.model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")}
    with_lora = megatron_logits(built, batch)
    # Gradients reach the adapters only (B = 0 still gives A a zero grad, B a nonzero one).
    kwargs = built.family.model_inputs(built.settings, dict(batch))
    built.model(**kwargs, runtime_gather_output=True).float().pow(2).mean().backward()
    grads = {n for n, p in built.model.named_parameters() if p.grad is not None}
    b_grads = [p.grad.abs().max() for n, p in built.model.named_parameters() if n.endswith("lora_B")]
    return dict(
        names=names, trainable=trainable, adapters=adapters, grads=grads, base=base,
        with_lora=with_lora, min_b_grad=float(min(b_grads)), state=sorted(adapter_state_dict(built.model)),
    )


def test_apply_lora_freezes_base_and_starts_as_noop(tiny_hf):
    r = run_parallel(_freeze_and_noop, 1, str(tiny_hf))
    names = r["names"]
    assert len(names) == 4 * 4 + 4 * 4 + 2  # LM layers x 4 targets, ViT blocks x 4, merger fc1/fc2
    assert "vision.merger.linear_fc1" in names and "vision.layers.0.mlp.linear_fc2" in names
    assert "language_model.decoder.layers.3.self_attention.linear_qkv" in names
    assert len(r["adapters"]) == 2 * len(names)
    assert r["trainable"] == r["adapters"] == r["grads"]
    assert r["min_b_grad"] > 0
    assert r["state"] == sorted(f"{n}.lora_{x}" for n in names for x in "AB")
    assert torch.equal(r["base"], r["with_lora"])  # B = 0: exactly the base model


def _vision_only(hf_dir: str) -> list[str]:
    from vlm_bridge.peft import LoraConfig, apply_lora

    built = build(hf_dir, ParallelConfig())
    return apply_lora(built.model, LoraConfig(components=("vision",), targets=("linear_fc1", "linear_proj")))


def test_components_select_by_prefix(tiny_hf):
    names = run_parallel(_vision_only, 1, str(tiny_hf))
    assert sorted(names) == sorted(
        f"vision.layers.{i}.{m}" for i in range(4) for m in ("mlp.linear_fc1", "self_attention.linear_proj")
    )


def _targets_as_named(hf_dir: str, targets: tuple[str, ...]) -> list[str] | str:
    from vlm_bridge.peft import LoraConfig, apply_lora

    built = build(hf_dir, ParallelConfig())
    try:
        return sorted(apply_lora(built.model, LoraConfig(targets=targets)))
    except ValueError as err:
        return str(err)


def test_targets_take_transformers_names_and_all_linear(tiny_hf):
    """PEFT and ms-swift users name transformers' projections (or ``all-linear``); Megatron fuses
    q/k/v and gate/up, so those names select the fused layers; a name of neither kind is refused
    with the names the components offer."""
    megatron = run_parallel(_targets_as_named, 1, str(tiny_hf), ("linear_qkv", "linear_proj", "linear_fc1",
                                                                 "linear_fc2"))
    hf = run_parallel(_targets_as_named, 1, str(tiny_hf), ("q_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"))
    every = run_parallel(_targets_as_named, 1, str(tiny_hf), ("all-linear",))
    assert hf == every == megatron and len(megatron) == 4 * 4  # 4 layers, no output layer
    assert run_parallel(_targets_as_named, 1, str(tiny_hf), ("q_proj",)) == [
        n for n in megatron if n.endswith("linear_qkv")]
    offered = ("the linear layers here are named linear_fc1, linear_fc2, linear_proj, linear_qkv (q_proj, "
               "k_proj, v_proj, qkv_proj, qkv, o_proj, proj, gate_proj, up_proj, down_proj, fc1, fc2 as "
               "transformers names them), or all-linear")
    # a typo next to a good name would otherwise just adapt fewer layers
    for targets in (("attn",), ("q_proj", "kv_proj")):
        refused = run_parallel(_targets_as_named, 1, str(tiny_hf), targets)
        assert refused == f"peft.targets: {targets[-1]} names no linear layer; {offered}"
    # a name some family has, but this model not: the component offers nothing to adapt
    refused = run_parallel(_targets_as_named, 1, str(tiny_hf), ("in_proj",))
    assert refused == ("peft.targets=in_proj names no linear layer of the LoRA components ['language_model'] "
                       f"in this model: {offered}")


def _merge_unmerge(hf_dir: str, use_dora: bool) -> dict:
    from vlm_bridge.peft import LoraConfig, apply_lora, lora_modules, merge_lora, unmerge_lora
    from vlm_bridge.peft.lora import randomize_adapters_

    built = build(hf_dir, ParallelConfig())
    batch = make_batch(hf_dir)
    base_logits = megatron_logits(built, batch)
    cfg = LoraConfig(rank=4, alpha=8.0, components=ALL, use_dora=use_dora)
    apply_lora(built.model, cfg)
    randomize_adapters_(built.model, seed=3)
    mods = lora_modules(built.model)
    bases = {n: m.base_layer.weight.detach().clone() for n, m in mods.items()}
    adapter = megatron_logits(built, batch)
    merge_lora(built.model)
    merged = megatron_logits(built, batch)
    weight_ok = []
    for n, m in mods.items():
        expected = bases[n] + cfg.scaling * (m.lora_B @ m.lora_A)
        if use_dora:
            expected = (m.lora_magnitude / expected.norm(dim=1))[:, None] * expected
        weight_ok.append(torch.allclose(m.base_layer.weight, expected, rtol=0, atol=1e-6))
    unmerge_lora(built.model)
    restored = all(torch.equal(m.base_layer.weight, bases[n]) for n, m in mods.items())
    return dict(base=base_logits, adapter=adapter, merged=merged, unmerged=megatron_logits(built, batch),
                weight_ok=weight_ok, restored=restored)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_equals_adapter_and_unmerge_is_exact(tiny_hf, use_dora):
    r = run_parallel(_merge_unmerge, 1, str(tiny_hf), use_dora)
    assert (r["adapter"] - r["base"]).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(r["merged"], r["adapter"], rtol=0, atol=1e-5)
    assert all(r["weight_ok"]) and len(r["weight_ok"]) == 34
    assert r["restored"]
    assert torch.equal(r["unmerged"], r["adapter"])


def _export(hf_dir: str, out_dir: str, components: tuple, use_dora: bool) -> torch.Tensor:
    from vlm_bridge.peft import LoraConfig, apply_lora, export_hf_peft
    from vlm_bridge.peft.lora import randomize_adapters_

    built = build(hf_dir, ParallelConfig())
    apply_lora(built.model, LoraConfig(rank=4, alpha=8.0, components=components, use_dora=use_dora))
    randomize_adapters_(built.model, seed=5, std=0.1)
    export_hf_peft(built, out_dir, hf_dir)
    return megatron_logits(built, make_batch(hf_dir))


@pytest.mark.parametrize(
    "components,use_dora", [(ALL, False), (("language_model",), True)], ids=["lora-all", "dora-lm"]
)
def test_exported_adapter_matches_hf_peft(tiny_hf, tmp_path, components, use_dora):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    mg = run_parallel(_export, 1, str(tiny_hf), str(out), components, use_dora)
    batch = make_batch(str(tiny_hf))
    hf, hf_base, peft_state = hf_peft_logits(str(tiny_hf), str(out), batch)
    valid = batch["attention_mask"].bool()
    assert valid.sum() > 150
    assert float((hf[valid] - hf_base[valid]).abs().max()) > 1e-2  # the adapter does something
    assert float((hf[valid] - mg[valid]).abs().max()) <= TOL
    saved = load_file(out / "adapter_model.safetensors")
    assert sorted(saved) == sorted(peft_state)  # every tensor we wrote is one peft uses, and vice versa
    assert all(torch.equal(saved[k], peft_state[k]) for k in saved)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_dora"] is use_dora and config["base_model_name_or_path"] == str(tiny_hf)
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    assert key in saved
    if "vision" in components:
        assert "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight" in saved
        assert "base_model.model.model.visual.merger.mlp.2.lora_A.weight" in saved
    if use_dora:
        key = "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_magnitude_vector"
        assert saved[key].shape == (128,)


def _checkpoint(hf_dir: str, ckpt: str) -> dict:
    from megatron.core import dist_checkpointing

    from vlm_bridge.peft import LoraConfig, adapter_state_dict, apply_lora
    from vlm_bridge.peft.lora import randomize_adapters_

    cfg = LoraConfig(rank=4, components=ALL, use_dora=True)
    base_keys = {s.key for s in _sharded(build(hf_dir, ParallelConfig()).model)}
    built = build(hf_dir, ParallelConfig())
    apply_lora(built.model, cfg)
    randomize_adapters_(built.model, seed=7)
    keys = {s.key for s in _sharded(built.model)}
    dist_checkpointing.save(built.model.sharded_state_dict(), ckpt)
    fresh = build(hf_dir, ParallelConfig())
    apply_lora(fresh.model, cfg)
    state = dist_checkpointing.load(fresh.model.sharded_state_dict(), ckpt)
    fresh.model.load_state_dict(state, strict=True)
    a, b = adapter_state_dict(built.model), adapter_state_dict(fresh.model)
    return dict(base_keys=base_keys, keys=keys, equal=sorted(a) == sorted(b) and all(
        torch.equal(a[k], b[k]) for k in a))


def _sharded(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [v for v in nested_values(model.sharded_state_dict()) if hasattr(v, "key")]


def test_torch_dist_checkpoint_keeps_base_keys_and_round_trips(tiny_hf, tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = run_parallel(_checkpoint, 1, str(tiny_hf), str(tmp_path / "ckpt"))
    extra = r["keys"] - r["base_keys"]
    assert r["base_keys"] <= r["keys"]
    assert extra and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude") for k in extra)
    assert r["equal"]


def test_the_adapter_names_its_base_model_by_hub_id_or_absolute_path(tmp_path, monkeypatch):
    from vlm_bridge.peft.hf_export import base_model_reference

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model_reference("base") == str(tmp_path / "base")
    assert base_model_reference("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    # a hub id resolves to its snapshot in the cache; the adapter names the hub id, not this machine's path
    entry = tmp_path / "hub" / "models--acme--tiny-vl"
    snapshot, older = entry / "snapshots" / ("0" * 40), entry / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    older.mkdir()
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    assert base_model_reference(str(snapshot)) == "acme/tiny-vl"
    # a snapshot refs/main does not name is another revision than the hub id's: its path is kept
    assert base_model_reference(str(older)) == str(older)
