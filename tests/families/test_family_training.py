"""Per family: packed rows train exactly like padded ones, and LoRA on the vision tower and
projector trains them through the shared trainer (and exports as an HF-PEFT adapter)."""

from __future__ import annotations

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
