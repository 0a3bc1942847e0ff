"""Per family: packed rows train exactly like padded ones, and LoRA on the vision tower and
projector trains them through the shared trainer (and exports as an HF-PEFT adapter)."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import run_parallel


def _packed_vs_padded(hf_dir: str, jsonl: str):
    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.data.sources import load_source
    from vlm_bridge.inference.requests import ensure_pad_token
    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.train.batching import collate_packed, collate_padded

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    processor = load_processor(hf_dir)
    ensure_pad_token(processor.tokenizer)  # as every shared batching path does
    encoder = SampleEncoder(processor, 256)
    samples = [encoder.encode(s) for s in list(load_source(f"jsonl:{jsonl}"))[:4]]
    pad = processor.tokenizer.pad_token_id
    results = []
    for mb in (collate_packed([samples[:2], samples[2:]], built.family, built.settings, 256, pad),
               collate_padded(samples, built.family, built.settings, pad)):
        built.model.zero_grad(set_to_none=True)
        per_token = built.model(**mb.inputs, labels=mb.labels)
        loss = (per_token * mb.loss_mask).sum() / mb.loss_mask.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads, float(mb.loss_mask.sum()), sorted(mb.inputs)))
    return results


def test_packed_and_padded_batches_give_same_loss_and_grads(case, shapes_jsonl):
    """Each packed sample keeps its own positions, segments and the family's per-token inputs
    (e.g. image spans), so loss and gradients equal the padded batch's."""
    family, hf = case
    (loss_p, grads_p, n_p, keys_p), (loss_u, grads_u, n_u, keys_u) = run_parallel(
        _packed_vs_padded, 1, str(hf), str(shapes_jsonl))
    assert keys_p == keys_u and set(family.token_keys) <= set(keys_p)
    assert n_p == n_u > 0
    assert abs(loss_p - loss_u) <= 1e-5, (loss_p, loss_u)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) > 20
    for name in grads_p:
        diff = (grads_p[name] - grads_u[name]).abs().max().item()
        assert diff <= 1e-5, (name, diff)


def test_lora_on_the_vision_tower_trains_it(case, shapes_jsonl, tmp_path):
    """Adapters on the language model and the vision tower start at B = 0; after a few steps both
    have moved, and the run exports them as an HF-PEFT adapter."""
    from safetensors.torch import load_file

    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides
    from vlm_bridge.train.trainer import train

    _, hf = case
    cfg = apply_overrides(get_recipe("demo_tiny"), [
        "steps=3", "global_batch_size=4", "micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=1e-2",
        "peft.method=lora", "peft.components=language_model,vision", "checkpoint.export_hf=true",
    ])
    cfg.pretrained, cfg.output_dir, cfg.data.train = str(hf), str(tmp_path / "run"), f"jsonl:{shapes_jsonl}"
    result = run_parallel(train, 1, cfg)
    assert len(result["losses"]) == 3 and all(map(torch.isfinite, torch.tensor(result["losses"])))
    adapter = load_file(tmp_path / "run" / "checkpoints" / "iter_0000003" / "hf_peft_adapter"
                        / "adapter_model.safetensors")
    moved = {k for k, v in adapter.items() if "lora_B" in k and v.abs().max() > 0}
    assert any(".language_model." not in k for k in moved), sorted(adapter)[:5]  # the vision tower
    assert any(".language_model." in k for k in moved)


def _elementwise_recompute_step(hf_dir: str, jsonl: str, lora: bool):
    from torch.multiprocessing.reductions import StorageWeakRef

    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.data.sources import load_source
    from vlm_bridge.inference.requests import ensure_pad_token
    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.parallel import ParallelConfig, device, init_distributed
    from vlm_bridge.train.batching import collate_packed
    from vlm_bridge.train.config import FreezeSettings, PeftSettings
    from vlm_bridge.train.elementwise_recompute import (
        apply_elementwise_recompute,
        dense_mlp,
        norm_consumer_pairs,
    )
    from vlm_bridge.train.freeze import apply_freeze_and_peft
    from vlm_bridge.train.recompute import layers_kept_whole

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    model = built.model.train()
    if lora:
        apply_freeze_and_peft(model, FreezeSettings(), PeftSettings(method="lora", rank=4, alpha=8.0))
    processor = load_processor(hf_dir)
    ensure_pad_token(processor.tokenizer)
    encoder = SampleEncoder(processor, 256)
    samples = [encoder.encode(s) for s in list(load_source(f"jsonl:{jsonl}"))[:4]]
    mb = collate_packed([samples[:2], samples[2:]], built.family, built.settings, 256,
                        processor.tokenizer.pad_token_id).to(device())
    layers = layers_kept_whole(model, [])
    watched = {"norm": [], "activation": []}

    def watch(kind, tensor):
        watched[kind].append(StorageWeakRef(tensor.untyped_storage()))

    for layer in layers:
        for norm, _ in norm_consumer_pairs(layer):
            norm.register_forward_hook(lambda m, a, out: watch("norm", out))
        if dense_mlp(layer) is not None:
            dense_mlp(layer).linear_fc2.register_forward_pre_hook(lambda m, a: watch("activation", a[0]))

    def step():
        for refs in watched.values():
            refs.clear()
        model.zero_grad(set_to_none=True)
        per_token = model(**mb.inputs, labels=mb.labels)
        loss = (per_token * mb.loss_mask).sum() / mb.loss_mask.sum()
        # the forward is done, the backward not yet (which runs the norms again)
        freed = {kind: (sum(ref.expired() for ref in refs), len(refs)) for kind, refs in watched.items()}
        loss.backward()
        return float(loss), freed, {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None}

    kept = step()
    hooked = apply_elementwise_recompute(layers)
    return kept, step(), hooked


@pytest.mark.parametrize("lora", [False, True], ids=["sft", "lora"])
def test_rebuilt_norm_and_activation_outputs_are_not_kept_and_grads_are_bit_exact(case, shapes_jsonl, lora):
    """With ``recompute_elementwise`` no pre-norm output and no dense-MLP activation output outlives
    the forward (every LM and ViT layer, Mamba layers included, with and without LoRA on the
    linears); the backward rebuilds them and the gradients are unchanged, bit for bit."""
    _, hf = case
    (loss_k, freed_k, grads_k), (loss_r, freed_r, grads_r), hooked = run_parallel(
        _elementwise_recompute_step, 1, str(hf), str(shapes_jsonl), lora)
    (norms, n_norms), (acts, n_acts) = freed_r["norm"], freed_r["activation"]
    assert hooked == n_norms + n_acts and n_norms > 4 and n_acts >= 2, freed_r
    assert norms == n_norms and acts == n_acts, freed_r
    # kept without it: all of them in SFT; with LoRA on the LM, the norm outputs its adapters save
    # (a MoE LM has no dense MLP, and the frozen vision tower keeps nothing)
    if lora:
        assert freed_k["norm"][0] < n_norms, freed_k
    else:
        assert freed_k == {"norm": (0, n_norms), "activation": (0, n_acts)}, freed_k
    assert loss_k == loss_r and grads_k.keys() == grads_r.keys() and len(grads_k) > 8
    for name, grad in grads_k.items():
        assert torch.equal(grad, grads_r[name]), name


def _frozen_tower_step(hf_dir: str, jsonl: str, out_dir: str, ahead: bool) -> dict:
    """One forward/backward of a LoRA step (tower frozen) over four micro-batches: the loss, the
    adapters' gradients, how many times the tower ran, and how many distinct tower callables the
    micro-batches' ``encode_vision`` calls named."""
    import os

    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides
    from vlm_bridge.train.trainer import _global_loss, forward_backward, setup

    cfg = apply_overrides(get_recipe("demo_tiny"), [
        "steps=1", "global_batch_size=4", "micro_batch_size=1", "peft.method=lora", "data.pack=false"])
    cfg.pretrained, cfg.output_dir, cfg.data.train = hf_dir, out_dir, f"jsonl:{jsonl}"
    os.environ["VLM_BRIDGE_ENCODE_AHEAD"] = "1" if ahead else "0"
    try:
        run = setup(cfg)
        model, runs, callables = run.built.model, [], set()
        model.vision.register_forward_hook(lambda *_: runs.append(1))
        encode_vision = model.encode_vision

        def recording(encode, *args, **kwargs):  # a bound method is a new object per access
            callables.add((id(getattr(encode, "__self__", None)), getattr(encode, "__func__", encode)))
            return encode_vision(encode, *args, **kwargs)

        model.encode_vision = recording
        outputs, _ = forward_backward(run)
    finally:
        os.environ.pop("VLM_BRIDGE_ENCODE_AHEAD", None)
    grads = {n: p.main_grad.clone() for n, p in run.model.module.named_parameters() if p.requires_grad}
    return {"loss": _global_loss(outputs), "grads": grads, "tower_runs": len(runs),
            "callables": len(callables),
            "tower_frozen": not any(p.requires_grad for p in run.built.model.vision.parameters())}


def test_a_frozen_tower_encodes_images_and_videos_of_a_step_together(case, shapes_jsonl, tmp_path):
    """With the tower frozen (LoRA on the language model), four micro-batches of images, a
    text-only conversation and (where the family has video) a video go through the tower in one
    call per tower callable they use, where each micro-batch with media took one; the loss and the
    adapters' gradients are those of encoding each micro-batch on its own."""
    import json

    from vlm_bridge.testing.context_parallel import packed_samples
    from vlm_bridge.testing.generation import write_parity_media

    family, hf = case
    video = write_parity_media(tmp_path / "media")["video"]
    rows = packed_samples(family, shapes_jsonl, video)
    rows = (rows + rows)[:4] if len(rows) < 4 else rows
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    apart = run_parallel(_frozen_tower_step, 1, str(hf), str(data), str(tmp_path / "a"), False)
    ahead = run_parallel(_frozen_tower_step, 1, str(hf), str(data), str(tmp_path / "b"), True)
    assert apart["tower_frozen"] and apart["tower_runs"] == 3, apart["tower_runs"]
    # one tower call per callable the step's media use (images and videos may share one)
    assert ahead["tower_runs"] == apart["callables"], (ahead["tower_runs"], apart["callables"])
    assert apart["callables"] == ahead["callables"] >= 1
    assert ahead["loss"] == pytest.approx(apart["loss"], rel=1e-5)
    assert ahead["grads"].keys() == apart["grads"].keys() and len(ahead["grads"]) > 4
    for name, grad in apart["grads"].items():
        torch.testing.assert_close(ahead["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
