"""LoRA / DoRA at TP=2 and PP=2 (spawned gloo ranks) equal TP=1: logits, merged logits, the HF-PEFT
export, adapter gradients (TP), and a torch_dist checkpoint of the adapted model saved at TP=2 loads
at TP=1."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import ParallelConfig, run_parallel

pytestmark = pytest.mark.slow
VARIANTS = {  # name: (components, use_dora)
    "lora": (("language_model", "vision", "projector"), False),
    "dora": (("language_model",), True),
}


def _build(hf_dir: str, parallel: ParallelConfig, name: str):
    from vlm_bridge.loading import load_hf
    from vlm_bridge.peft import LoraConfig, apply_lora

    built = load_hf(hf_dir, parallel, torch.float32)
    built.model.eval()
    components, use_dora = VARIANTS[name]
    apply_lora(built.model, LoraConfig(rank=4, alpha=8.0, components=components, use_dora=use_dora))
    return built


def _logits(built, batch):
    from vlm_bridge.runtime import last_stage_rank, pipeline_forward_logits, to_rank0

    logits = pipeline_forward_logits(built.model, built.family.model_inputs(built.settings, dict(batch)))
    vocab = built.settings.vocab_size
    return to_rank0(logits[..., :vocab] if logits is not None else None, last_stage_rank())


def _adapter_grads(built, batch) -> dict:
    """Full (TP-gathered) adapter gradients of a squared-logits loss."""
    from vlm_bridge.convert.distribute import gather
    from vlm_bridge.peft import lora_modules

    kwargs = built.family.model_inputs(built.settings, dict(batch))
    logits = built.model(**kwargs, runtime_gather_output=True)[..., : built.settings.vocab_size]
    logits.pow(2).mean().backward()
    return {
        f"{name}.{p_name}": gather(p.grad, p, mod.tp_chunks)
        for name, mod in lora_modules(built.model).items()
        for p_name, p in mod.adapter_parameters().items()
    }


def _run(hf_dir: str, out_dir: str, tp: int, pp: int, load_from: str | None) -> None:
    """Per variant, into ``out_dir/<variant>``: the HF-PEFT export, ``logits.pt`` (adapter, merged,
    and, with ``load_from``, a fresh model loaded from ``load_from/<variant>``), adapter gradients
    and a torch_dist checkpoint.

    Files, not return values: run_parallel joins its ranks before reading their results.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from transformers import AutoProcessor

    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.peft import export_hf_peft, merge_lora
    from vlm_bridge.peft.lora import randomize_adapters_
    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    parallel = ParallelConfig(tp=tp, pp=pp)
    init_distributed(parallel)
    images, video = default_media()
    processor = AutoProcessor.from_pretrained(hf_dir, local_files_only=True)
    batch = build_batch(processor, images, video, DEFAULT_PROMPT)
    for name in VARIANTS:
        built = _build(hf_dir, parallel, name)
        randomize_adapters_(built.model, seed=11, std=0.1)
        export_hf_peft(built, f"{out_dir}/{name}", hf_dir)
        dist_checkpointing.save(built.model.sharded_state_dict(), f"{out_dir}/{name}/ckpt")
        logits = [_logits(built, batch)]
        if pp == 1:  # a plain forward/backward; PP would need the schedule
            grads = _adapter_grads(built, batch)
            if dist.get_rank() == 0:
                torch.save(grads, f"{out_dir}/{name}/grads.pt")
        merge_lora(built.model)
        logits.append(_logits(built, batch))
        if load_from:
            fresh = _build(hf_dir, parallel, name)
            state = dist_checkpointing.load(fresh.model.sharded_state_dict(), f"{load_from}/{name}/ckpt")
            fresh.model.load_state_dict(state, strict=True)
            logits.append(_logits(fresh, batch))
        if logits[0] is not None:
            torch.save(logits, f"{out_dir}/{name}/logits.pt")


def _assert_same_export(one, two) -> None:
    from safetensors.torch import load_file

    e1, e2 = (load_file(d / "adapter_model.safetensors") for d in (one, two))
    assert sorted(e1) == sorted(e2)
    for key in e1:
        if key.endswith("lora_magnitude_vector"):  # initial row norms: summation order differs
            assert torch.allclose(e1[key], e2[key], rtol=1e-6, atol=0), key
        else:
            assert torch.equal(e1[key], e2[key]), key
    assert (one / "adapter_config.json").read_text() == (two / "adapter_config.json").read_text()


def test_tp2_and_pp2_adapters_equal_tp1(tiny_hf, tmp_path):
    for layout in ("tp1", "tp2", "pp2"):
        for name in VARIANTS:
            (tmp_path / layout / name / "ckpt").mkdir(parents=True)
    run_parallel(_run, 2, str(tiny_hf), str(tmp_path / "tp2"), 2, 1, None)
    run_parallel(_run, 2, str(tiny_hf), str(tmp_path / "pp2"), 1, 2, None)
    run_parallel(_run, 1, str(tiny_hf), str(tmp_path / "tp1"), 1, 1, str(tmp_path / "tp2"))
    for name in VARIANTS:
        a1, m1, loaded = torch.load(tmp_path / "tp1" / name / "logits.pt")
        for layout in ("tp2", "pp2"):
            a2, m2 = torch.load(tmp_path / layout / name / "logits.pt")
            assert float((a1 - a2).abs().max()) <= 1e-4, (name, layout)
            assert float((m2 - a2).abs().max()) <= 1e-4, (name, layout)  # merge (DoRA: all-reduced norms)
            _assert_same_export(tmp_path / "tp1" / name, tmp_path / layout / name)
        assert float((loaded - a1).abs().max()) <= 1e-4, name  # TP=2 checkpoint read at TP=1
        g1, g2 = (torch.load(tmp_path / layout / name / "grads.pt") for layout in ("tp1", "tp2"))
        assert sorted(g1) == sorted(g2)
        for key in g1:  # autograd through copy_to / reduce_from regions gives the TP=1 gradients
            assert g1[key].abs().max() > 0, key
            torch.testing.assert_close(g2[key], g1[key], rtol=1e-4, atol=1e-6, msg=key)


def _dora_on_a_gathered_column(tp: int) -> dict:
    """A column-parallel layer that gathers its output (Gemma 3's projector) under DoRA."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.peft import LoraConfig
    from vlm_bridge.peft.layer import LoraLinear

    init_distributed(ParallelConfig(tp=tp))
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False)
    base = ColumnParallelLinear(8, 6, config=config, init_method=lambda w: None, bias=True,
                                gather_output=True, tp_group=parallel_state.get_tensor_model_parallel_group())
    g = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(6, 8, generator=g), "b": torch.randn(6, generator=g),
            "B": torch.randn(6, 4, generator=g), "m": torch.rand(6, generator=g) + 0.5,
            "x": torch.randn(3, 8, generator=g)}
    layer = LoraLinear(base, LoraConfig(rank=4, alpha=8.0, use_dora=True), "projector.linear_fc1")
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():  # every one of them is split by output rows
        pairs = ((base.weight, "w"), (base.bias, "b"), (layer.lora_B, "B"), (layer.lora_magnitude, "m"))
        for param, key in pairs:
            param.copy_(full[key].chunk(tp, dim=0)[rank])
    out, _ = layer(full["x"])
    return {"out": out.detach(), "A": layer.lora_A.detach(), **full}


@pytest.mark.parametrize("tp", [1, 2])
def test_dora_on_a_layer_that_gathers_its_output_matches_the_whole_layer(tp):
    got = run_parallel(_dora_on_a_gathered_column, tp, tp)
    w, b, big_b, m, x, a = (got[k] for k in ("w", "b", "B", "m", "x", "A"))
    scaling = 8.0 / 4
    scale = m / torch.linalg.norm(w + scaling * big_b @ a, dim=1)  # HF PEFT's DoRA, whole layer
    want = x @ w.T + b + (scale - 1) * (x @ w.T) + scale * scaling * (x @ a.T @ big_b.T)
    torch.testing.assert_close(got["out"], want, rtol=1e-5, atol=1e-5)


def _dora_dropout_input_gradient(tp: int) -> torch.Tensor:
    """The input gradient of a column-parallel layer (output rows split) under DoRA with dropout,
    with a magnitude that makes the DoRA scale differ from 1."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.peft import LoraConfig
    from vlm_bridge.peft.layer import LoraLinear

    init_distributed(ParallelConfig(tp=tp))
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False)
    group = parallel_state.get_tensor_model_parallel_group()
    base = ColumnParallelLinear(8, 6, config=config, init_method=lambda w: None, bias=False,
                                gather_output=False, tp_group=group)
    g = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(6, 8, generator=g), "B": torch.randn(6, 4, generator=g),
            "m": torch.rand(6, generator=g) + 0.5, "upstream": torch.randn(3, 6, generator=g)}
    layer = LoraLinear(base, LoraConfig(rank=4, alpha=8.0, use_dora=True, dropout=0.5), "linear_fc1")
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for param, key in ((base.weight, "w"), (layer.lora_B, "B"), (layer.lora_magnitude, "m")):
            param.copy_(full[key].chunk(tp, dim=0)[rank])
    x = torch.randn(3, 8, generator=g).requires_grad_()
    torch.manual_seed(1)  # the replicated input's dropout mask: the same on every rank and at TP=1
    out, _ = layer(x)
    (out * full["upstream"].chunk(tp, dim=-1)[rank]).sum().backward()
    return x.grad


def test_dora_with_dropout_gives_a_column_parallel_layer_its_whole_input_gradient():
    """With dropout, DoRA runs the base weight on the dropped input itself; under TP each rank's
    part of that input gradient must be summed, as the base layer sums its own. Left alone it
    differed across ranks, and the replicated adapters of the layers before drifted apart."""
    one = run_parallel(_dora_dropout_input_gradient, 1, 1)
    two = run_parallel(_dora_dropout_input_gradient, 2, 2)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
