"""Training on Megatron-Core: learning, layout invariance, packing, resume, freeze flags."""

from __future__ import annotations

import os

import pytest
from conftest import run_train


def test_loss_decreases_on_shapes_task(tiny_cfg):
    result = run_train(tiny_cfg(steps=18, global_batch_size=8, micro_batch_size=4))
    first, last = sum(result["losses"][:3]) / 3, sum(result["losses"][-3:]) / 3
    assert last < 0.6 * first, result["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.pp": 2}])
def test_tp_and_pp_match_tp1_losses(tiny_cfg, layout, tmp_path):
    # each run its own folder: the second would otherwise find the first's final checkpoint
    base = run_train(tiny_cfg(steps=4, output_dir=tmp_path / "tp1"))["losses"]
    other = run_train(tiny_cfg(steps=4, output_dir=tmp_path / "other", **layout), world=2)["losses"]
    assert len(base) == len(other) == 4
    for a, b in zip(base, other):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (base, other)


def test_resume_reproduces_uninterrupted_losses(tiny_cfg, tmp_path):
    full = run_train(tiny_cfg(steps=6, output_dir=tmp_path / "full"))["losses"]
    cfg = tiny_cfg(steps=6, output_dir=tmp_path / "cut", **{"checkpoint.save_every": 3})
    first = run_train(cfg, stop_after=3)["losses"]
    assert first == full[:3]
    resumed = run_train(cfg)["losses"]
    assert resumed == full, (resumed, full)
    # extended with a new peak lr: the config's schedule applies from the checkpoint's step on
    longer = tiny_cfg(steps=8, output_dir=tmp_path / "cut", **{"checkpoint.save_every": 3, "optim.lr": "0.5",
                                                               "optim.min_lr": "0.25"})
    extended = run_train(longer)
    assert len(extended["losses"]) == 8 and len(extended["lrs"]) == 2
    assert all(0.25 <= lr <= 0.5 for lr in extended["lrs"]), extended["lrs"]
    # asked for fewer steps than the run holds: nothing is trained, nor saved again
    saves = tmp_path / "cut" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in saves.iterdir()}
    again = run_train(tiny_cfg(steps=6, output_dir=tmp_path / "cut", **{"checkpoint.save_every": 3}))
    assert again["steps"] == again["start_step"] == 8 and again["lrs"] == []
    assert {p.name: p.stat().st_mtime_ns for p in saves.iterdir()} == before
    # nor are the saved weights and optimizer state read, which other settings could not take
    other = run_train(tiny_cfg(steps=6, output_dir=tmp_path / "cut", **{"peft.method": "lora"}))
    assert other["steps"] == other["start_step"] == 8


def test_a_checkpoint_saved_while_the_next_step_is_built_resumes_at_the_step_trained(tiny_cfg, tmp_path):
    import shutil

    from vlm_bridge.train import checkpoint as ckpt

    cfg = tiny_cfg(steps=5, output_dir=tmp_path / "run", **{"checkpoint.save_every": 2})
    full = run_train(cfg)  # step 3 was built ahead while step 2 trained and was saved
    root = tmp_path / "run" / "checkpoints"
    for step in (4, 5):
        shutil.rmtree(ckpt.iteration_dir(root, step))
    (root / ckpt.LATEST).write_text("2")
    resumed = run_train(cfg)
    assert resumed["start_step"] == 2 and resumed["losses"] == full["losses"], (resumed, full)


def test_samples_encoded_by_worker_processes_train_the_same_losses(tiny_cfg, tmp_path):
    here = run_train(tiny_cfg(steps=3, output_dir=tmp_path / "a", **{"data.workers": "0"}))
    ahead = run_train(tiny_cfg(steps=3, output_dir=tmp_path / "b", **{"data.workers": "2"}))
    assert ahead["losses"] == here["losses"] and ahead["skipped"] == here["skipped"]


def test_keep_last_removes_older_checkpoints_after_each_save(tiny_cfg, tmp_path):
    from vlm_bridge.train import checkpoint as ckpt

    cfg = tiny_cfg(steps=3, output_dir=tmp_path / "run", **{"checkpoint.save_every": 1,
                                                           "checkpoint.keep_last": 2})
    run_train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    assert ckpt.latest_step(root) == 3
    (root / ".iter_0000004.tmp").mkdir()  # an unfinished save is not a checkpoint to count
    assert ckpt.prune_checkpoints(root, 1) == [root / "iter_0000002"]
    assert sorted(p.name for p in root.iterdir()) == [".iter_0000004.tmp", "iter_0000003", "latest"]
    # a run started afresh (checkpoint.resume=false) where an earlier run saved later steps: the
    # newest saves are its own, and the one latest names stays
    other = tmp_path / "other"
    for step, saved_at in ((6, 1_000), (2, 2_000), (4, 3_000)):
        (ckpt.iteration_dir(other, step) / "weights").mkdir(parents=True)
        (ckpt.iteration_dir(other, step) / "weights" / ".metadata").write_text("")
        os.utime(ckpt.iteration_dir(other, step) / "weights" / ".metadata", (saved_at, saved_at))
    (other / "latest").write_text("4\n")
    assert ckpt.prune_checkpoints(other, 1) == [other / "iter_0000006", other / "iter_0000002"]


def test_interrupted_save_is_never_latest(tiny_cfg, tmp_path):
    from vlm_bridge.train import checkpoint as ckpt

    cfg = tiny_cfg(steps=2, output_dir=tmp_path / "run", **{"checkpoint.save_every": 1})
    run_train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.latest_step(root) == 2
    # A save that died half-way leaves only its temporary folder behind.
    (root / ".iter_0000003.tmp" / "weights").mkdir(parents=True)
    assert ckpt.latest_step(root) == 2
    (root / "latest").write_text("3\n")  # a stale pointer falls back to the newest complete save
    assert ckpt.latest_step(root) == 2


def _trainable(hf_dir, freeze: dict, peft: str | None):
    import torch

    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.train.config import FreezeSettings, PeftSettings
    from vlm_bridge.train.freeze import apply_freeze_and_peft, component_of

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    apply_freeze_and_peft(built.model, FreezeSettings(**freeze), PeftSettings(method=peft))
    out = {"adapter": 0, "language_model": 0, "vision": 0, "projector": 0}
    for name, p in built.model.named_parameters():
        if p.requires_grad:
            out["adapter" if ".lora_" in name else component_of(name, built.model.component_prefixes)] += 1
    return out


@pytest.mark.parametrize(
    "freeze,peft,expected",
    [
        ({}, None, {"adapter": False, "language_model": True, "vision": True, "projector": True}),
        ({"vision": True}, None, {"adapter": False, "language_model": True, "vision": False,
                                  "projector": True}),
        ({}, "lora", {"adapter": True, "language_model": False, "vision": False, "projector": False}),
        ({"projector": False}, "lora", {"adapter": True, "language_model": False, "vision": False,
                                        "projector": True}),
    ],
)
def test_freeze_flags_change_exactly_the_trainable_set(tiny_hf, freeze, peft, expected):
    from vlm_bridge.parallel import run_parallel

    counts = run_parallel(_trainable, 1, str(tiny_hf), freeze, peft)
    assert {k: v > 0 for k, v in counts.items()} == expected, counts


def test_lora_run_exports_merged_weights_and_peft_adapter(tiny_cfg, tmp_path, run_cli):
    """A LoRA checkpoint: `vlm-bridge export` folds the adapters in; the run's own HF export
    and the HF-PEFT adapter (loaded with peft) give the same logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlm_bridge.testing.checks import checkpoint_mismatches

    cfg = tiny_cfg(steps=3, output_dir=tmp_path / "lora", **{
        "peft.method": "lora", "optim.lr": "5e-2", "checkpoint.export_hf": "true"})
    run_train(cfg)
    it = tmp_path / "lora" / "checkpoints" / "iter_0000003"
    out = tmp_path / "exported"
    assert run_cli("export", "--megatron-path", tmp_path / "lora", "--hf-path", out) == 0  # the run folder
    assert checkpoint_mismatches(out, it / "hf_export") == []  # its newest step, adapters folded in
    # verify takes the run folder too: its newest checkpoint against the run's own HF export
    assert run_cli("verify", "--hf-model", it / "hf_export", "--megatron-path", tmp_path / "lora") == 0
    assert checkpoint_mismatches(out, cfg.pretrained) != []  # the adapters changed the weights
    merged = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(cfg.pretrained)
    peft_model = PeftModel.from_pretrained(base, it / "hf_peft_adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    # a finished run re-run with checkpoint.export_hf=true exports its last checkpoint if it lacks one
    import shutil

    adapter = (it / "hf_peft_adapter" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(it / "hf_export")
    shutil.rmtree(it / "hf_peft_adapter")
    again = run_train(cfg)
    assert again["start_step"] == 3 and again["exported"] == str(it / "hf_export")
    assert checkpoint_mismatches(out, it / "hf_export") == []
    assert (it / "hf_peft_adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert run_train(cfg)["exported"] is None  # it has one now
    shutil.rmtree(it / "hf_peft_adapter")  # only the adapter missing (a stray file in its place)
    (it / "hf_peft_adapter").write_text("not an adapter")
    assert run_train(cfg)["exported"] == str(it / "hf_export")
    assert (it / "hf_peft_adapter" / "adapter_model.safetensors").read_bytes() == adapter


def _loss_vs_hf(hf_dir, jsonl):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.data.sources import load_source
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.train.batching import collate_padded

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    sample = SampleEncoder(AutoProcessor.from_pretrained(hf_dir), 256).encode(
        next(iter(load_source(f"jsonl:{jsonl}"))))
    mb = collate_padded([sample], built.family, built.settings, 0)
    with torch.no_grad():
        ours = (built.model(**mb.inputs, labels=mb.labels) * mb.loss_mask).sum() / mb.loss_mask.sum()
        hf = AutoModelForImageTextToText.from_pretrained(hf_dir)
        theirs = hf(**sample.model_inputs(), labels=sample.labels[None]).loss
    return float(ours), float(theirs)


def test_training_loss_equals_hf_loss(tiny_hf, shapes_data):
    """Same loss as HF on the same sample, with a vocabulary that Megatron pads (300 -> 384)."""
    from vlm_bridge.parallel import run_parallel

    ours, theirs = run_parallel(_loss_vs_hf, 1, str(tiny_hf), str(shapes_data["train"]))
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["off", "on"])
def test_resume_at_a_different_tensor_parallel_size(tiny_cfg, tmp_path, distributed):
    """Saved at TP=1, resumed at TP=2: the continued losses match the uninterrupted TP=1 run, with
    either optimizer (the distributed one saves its state in its canonical per-parameter form)."""
    over = {"optim.distributed_optimizer": distributed}
    full = run_train(tiny_cfg(steps=4, output_dir=tmp_path / "full", **over))["losses"]
    cfg = tiny_cfg(steps=4, output_dir=tmp_path / "cut", **{"checkpoint.save_every": 2}, **over)
    run_train(cfg, stop_after=2)
    cfg.parallel.tp = 2
    resumed = run_train(cfg, world=2)["losses"]
    assert resumed[:2] == full[:2]
    for a, b in zip(resumed[2:], full[2:]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (resumed, full)


def test_resume_with_adapter_dropout_reproduces_uninterrupted_losses(tiny_cfg, tmp_path):
    """A row-parallel adapter's dropout draws from Megatron's model-parallel RNG stream, which the
    checkpoint keeps with the others: resumed masks are the uninterrupted run's."""
    lora = {"peft.method": "lora", "peft.dropout": "0.1", "checkpoint.save_every": "2"}
    full = run_train(tiny_cfg(steps=4, output_dir=tmp_path / "full", **lora))
    assert full["start_step"] == 0 and full["rng_restored"] is None
    cfg = tiny_cfg(steps=4, output_dir=tmp_path / "cut", **lora)
    assert run_train(cfg, stop_after=2)["losses"] == full["losses"][:2]
    resumed = run_train(cfg)
    assert resumed["losses"] == full["losses"] and resumed["rng_restored"] is True
    # at another layout the streams cannot continue, and the run says so
    other = tiny_cfg(steps=6, output_dir=tmp_path / "cut", **lora, **{"parallel.tp": "2"})
    assert run_train(other, world=2)["rng_restored"] is False


def test_bf16_training_with_fp32_master_weights(tiny_cfg):
    result = run_train(tiny_cfg(steps=4, dtype="bf16"))
    assert len(result["losses"]) == 4 and all(v == v for v in result["losses"])
    assert result["losses"][-1] < result["losses"][0]


def test_fp16_updates_from_the_first_step_and_counts_skipped_updates(tiny_cfg, tmp_path):
    """The loss is a token sum until the step divides it, so fp16's first loss scale comes from a
    micro-batch's tokens: every step updates. A scale that overflows skips its updates, leaves the
    weights (so the losses) as they were, and is counted."""
    fp16 = {"dtype": "fp16", "optim.warmup_steps": "0", "steps": "3"}
    ok = run_train(tiny_cfg(output_dir=tmp_path / "a", **fp16))
    assert ok["skipped_updates"] == 0 and ok["losses"][-1] < ok["losses"][0], ok["losses"]
    over = run_train(tiny_cfg(output_dir=tmp_path / "b", **fp16, **{"optim.initial_loss_scale": str(2**32)}))
    still = run_train(tiny_cfg(output_dir=tmp_path / "c", **fp16, **{"optim.lr": "0", "optim.min_lr": "0"}))
    assert over["skipped_updates"] == 3 and over["losses"] == still["losses"], (over, still)


def test_a_skipped_update_is_named_on_its_step_line_between_logged_steps(tiny_cfg, tmp_path, capsys):
    from vlm_bridge.train.metrics import RunLogger

    logger = RunLogger(tiny_cfg(output_dir=tmp_path / "run", tensorboard="false", log_every="10"), True)
    stats = {"loss": 5.0, "lr": 1e-4, "grad_norm": 0.0, "tokens": 100}
    logger.log(1, {**stats, "update_ok": True}, 0.1)
    logger.log(2, {**stats, "update_ok": False, "loss_scale": 8.0}, 0.1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step     2/")
    assert lines[0].endswith("update skipped: fp16 gradients overflowed, loss scale now 8")


def test_moe_layers_recompute_on_the_cpu_too(tiny_cfg, tiny_qwen3_moe, tmp_path):
    """The recomputation inside the backward runs under the CPU layer as the forward did (the MoE
    router moves its weight to CUDA otherwise)."""
    plain = tiny_cfg(steps=2, output_dir=tmp_path / "a")
    # recompute_layers alone turns recomputation on (every component, first layer of each)
    recomputed = tiny_cfg(steps=2, output_dir=tmp_path / "b", recompute_layers="1")
    plain.pretrained = recomputed.pretrained = str(tiny_qwen3_moe)
    assert run_train(recomputed)["losses"] == pytest.approx(run_train(plain)["losses"], rel=1e-6)


def test_activation_recomputation_gives_the_same_losses(tiny_cfg, tmp_path):
    plain = run_train(tiny_cfg(steps=2, output_dir=tmp_path / "a"))["losses"]
    recomputed = run_train(tiny_cfg(steps=2, recompute="true", output_dir=tmp_path / "b"))["losses"]
    assert recomputed == pytest.approx(plain, rel=1e-6)
    # rebuilt norm outputs are bit-exact; with the vision tower recomputed whole, its layers are
    # left to the whole-layer checkpoint and the LM's norms are rebuilt
    norms = run_train(tiny_cfg(steps=2, recompute_elementwise="true", output_dir=tmp_path / "c"))["losses"]
    assert norms == plain
    both = tiny_cfg(steps=2, recompute_elementwise="true", recompute_components="vision",
                    output_dir=tmp_path / "d")
    assert run_train(both)["losses"] == pytest.approx(plain, rel=1e-6)


def test_non_finite_loss_stops_with_a_clear_message(tiny_cfg):
    from vlm_bridge.parallel import RankError

    cfg = tiny_cfg(steps=6, **{"optim.lr": "1e12", "optim.clip_grad": "0", "optim.warmup_steps": "0"})
    with pytest.raises((ValueError, RankError), match="loss is (nan|inf)") as stop:
        run_train(cfg)
    # the settings caused it: the CLI says it as one "error:" line (exit 2), not as an internal error
    assert isinstance(stop.value, ValueError) or stop.value.user_error


def _lr_groups(hf_dir, overrides):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides
    from vlm_bridge.train.trainer import _optimizer

    init_distributed(ParallelConfig())
    cfg = apply_overrides(get_recipe("demo_tiny"), overrides)
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    ddp = DistributedDataParallel(config=built.model.language_model.config,
                                  ddp_config=DistributedDataParallelConfig(), module=built.model)
    opt = _optimizer(cfg, ddp, torch.float32)
    by_param = {id(p): g["max_lr"] for g in opt.param_groups for p in g["params"]}
    names = {n: by_param[id(p)] for n, p in built.model.named_parameters() if id(p) in by_param}
    return names


@pytest.mark.parametrize("fixture", ["tiny_hf", "tiny_qwen3"])
def test_separate_learning_rates_per_component(request, fixture):
    """Every parameter gets its component's rate, including Qwen3-VL's learned position table
    (vision) and DeepStack mergers (projector)."""
    from vlm_bridge.parallel import run_parallel

    lrs = run_parallel(_lr_groups, 1, str(request.getfixturevalue(fixture)),
                       ["optim.lr=1e-3", "optim.vision_lr=1e-5", "optim.projector_lr=1e-4"])
    expected = {"vision.layers.0.mlp.linear_fc1.weight": 1e-5, "vision.patch_embed.weight": 1e-5,
                "vision.merger.linear_fc1.weight": 1e-4,
                "language_model.decoder.layers.0.mlp.linear_fc1.weight": 1e-3,
                "language_model.embedding.word_embeddings.weight": 1e-3}
    if fixture == "tiny_qwen3":
        expected.update({"vision.pos_embed.weight": 1e-5,
                         "vision.deepstack_mergers.0.linear_fc1.weight": 1e-4})
    assert {k: lrs[k] for k in expected} == expected
    assert set(lrs.values()) == {1e-5, 1e-4, 1e-3}


def test_run_writes_tensorboard_and_loss_plot(tiny_cfg, tmp_path):
    """Through a symlink whose target does not exist yet (a run folder on another disk)."""
    (tmp_path / "tb").symlink_to(tmp_path / "disk" / "tb")
    run_train(tiny_cfg(steps=2, tensorboard="true", output_dir=tmp_path / "tb"))
    assert (tmp_path / "tb").is_symlink()
    assert list((tmp_path / "disk" / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "disk" / "tb" / "loss.png").stat().st_size > 1000


def _recompute_choices(hf_dir):
    import torch

    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.train.recompute import apply_recompute, layers_to_recompute

    init_distributed(ParallelConfig())
    model = load_hf(hf_dir, ParallelConfig(), torch.float32).model
    chosen = {}
    for components, first in [((), 0), (("vision",), 0), (("language_model",), 0), (("vision",), 1),
                              ((), 2), (("projector",), 0), (("visual",), 0)]:
        try:
            chosen[components, first] = layers_to_recompute(model, components, first)
        except ValueError as exc:
            chosen[components, first] = str(exc)
    return chosen, apply_recompute(model)


def test_recompute_chooses_layers_by_component(tiny_hf):
    """Every LM and ViT layer by default; one component's layers, or the first N of each."""
    from vlm_bridge.parallel import run_parallel

    chosen, wrapped = run_parallel(_recompute_choices, 1, str(tiny_hf))
    vit = [f"vision.layers.{i}" for i in range(4)]
    lm = [f"language_model.decoder.layers.{i}" for i in range(4)]
    assert len(wrapped) == 8 and sorted(chosen[(), 0]) == sorted(vit + lm)
    assert chosen[("vision",), 0] == vit and chosen[("language_model",), 0] == lm
    assert chosen[("vision",), 1] == vit[:1] and sorted(chosen[(), 2]) == sorted(vit[:2] + lm[:2])
    assert chosen[("projector",), 0] == ("recompute_components: projector holds no transformer layer "
                                         "to recompute")
    assert chosen[("visual",), 0].startswith("recompute_components: visual is not a component of this model")


def _saved_bytes_and_grads(cfg):
    """Bytes autograd keeps for the backward (activations only, each storage once) over one step's
    forward, and the gradients that step produces."""
    import torch

    from vlm_bridge.train.trainer import forward_backward, setup

    run = setup(cfg)
    weights = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_backward(run)
    grads = {n: p.main_grad.clone() for n, p in run.model.module.named_parameters()}
    return sum(saved.values()), grads


def test_recomputing_the_vision_tower_keeps_gradients_and_drops_its_activations(tiny_cfg, tmp_path):
    import torch

    from vlm_bridge.parallel import run_parallel

    results = {}
    for name, over in [("none", {}), ("vision", {"recompute_components": "vision"}),
                       ("all", {"recompute": "true"})]:
        cfg = tiny_cfg(steps=1, global_batch_size=2, output_dir=tmp_path / name, **over)
        results[name] = run_parallel(_saved_bytes_and_grads, 1, cfg)
    (none, g_none), (vision, g_vision), (every, g_all) = results["none"], results["vision"], results["all"]
    assert every < vision < none, (none, vision, every)
    for grads in (g_vision, g_all):
        for key, grad in g_none.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("fixture,extra", [
    ("tiny_qwen3", {}),
    ("tiny_qwen3_moe", {"peft.method": "lora", "peft.targets": "linear_qkv,linear_proj"}),
])
def test_qwen3_vl_fine_tunes_through_the_same_stack(request, fixture, extra, tiny_cfg, tmp_path, run_cli):
    """No family-specific code in the trainer: dense SFT and MoE LoRA on Qwen3-VL. The saved
    checkpoint keeps the source's expert layout, so its HF export writes fused experts again,
    and the LoRA adapter exports in HF-PEFT format. `vlm-bridge export` of the SFT checkpoint
    (streamed from the files Megatron's own writer saved, one file per rank) equals the run's
    in-memory export."""
    import json

    from vlm_bridge.convert.hf_io import SafetensorsReader
    from vlm_bridge.testing.checks import checkpoint_mismatches

    cfg = tiny_cfg(steps=6, **{"optim.lr": "3e-3", "checkpoint.export_hf": "true", **extra})
    cfg.pretrained = str(request.getfixturevalue(fixture))
    result = run_train(cfg)
    assert len(result["losses"]) == 6 and result["losses"][-1] < result["losses"][0]
    saved = tmp_path / "run" / "checkpoints" / "iter_0000006"
    meta = json.loads((saved / "vlm_bridge.json").read_text())
    source = SafetensorsReader(cfg.pretrained).keys()
    assert SafetensorsReader(saved / "hf_export").keys() == source
    if fixture == "tiny_qwen3":
        assert run_cli("export", "--megatron-path", saved, "--hf-path", tmp_path / "streamed") == 0
        assert checkpoint_mismatches(tmp_path / "streamed", saved / "hf_export") == []
    if fixture == "tiny_qwen3_moe":
        assert meta["expert_layout"] == "fused_out_in"
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in source)
        assert (saved / "hf_peft_adapter" / "adapter_model.safetensors").is_file()


def test_moe_expert_parallel_training_matches_ep1(tiny_qwen3_moe, tiny_cfg, tmp_path):
    """SFT of the MoE model at EP=2 (experts split over two gloo ranks, all-to-all dispatch in
    forward and backward) follows the EP=1 losses; EP=1 optimizer state is not resumed at EP=2."""
    def cfg(name, **over):
        c = tiny_cfg(output_dir=tmp_path / name, **{"steps": 3, "optim.lr": "3e-3", **over})
        c.pretrained = str(tiny_qwen3_moe)
        return c

    base = run_train(cfg("ep1"))["losses"]
    ep2 = run_train(cfg("ep2", **{"parallel.ep": 2}), world=2)["losses"]
    assert len(base) == len(ep2) == 3 and base[-1] < base[0]
    for a, b in zip(base, ep2):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (base, ep2)
    with pytest.raises(RuntimeError, match="resume with parallel.ep=1, or start a new run"):
        run_train(cfg("ep1", steps=4, **{"parallel.ep": 2}), world=2)


def test_bf16_moments_train_and_resume_exactly(tiny_cfg, tmp_path):
    """bf16 weights, fp32 master, bf16 Adam moments: the loss falls, and a run resumed from a
    checkpoint (moments saved, loaded and narrowed back to bf16) repeats the uninterrupted one."""
    over = {"dtype": "bf16", "optim.moments": "bf16", "steps": 4, "optim.grad_reduce_in_fp32": "false",
            "optim.distributed_optimizer": "on"}  # two updates after the resume: its step count matters
    full = run_train(tiny_cfg(output_dir=tmp_path / "full", **over))["losses"]
    assert all(v == v for v in full) and full[-1] < full[0]
    cfg = tiny_cfg(output_dir=tmp_path / "cut", **over, **{"checkpoint.save_every": 2})
    assert run_train(cfg, stop_after=2)["losses"] == full[:2]
    assert run_train(cfg)["losses"] == full


def _save_and_list_helpers(cfg) -> dict:
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from vlm_bridge.train import checkpoint as ckpt
    from vlm_bridge.train import trainer

    run = trainer.setup(cfg)
    trainer.train_step(run)
    # (a pooled test process may hold one already, from a test that saves through Megatron itself)
    earlier, filesystem_async._results_queue = filesystem_async._results_queue, None
    before = {p.pid for p in multiprocessing.active_children()}
    path = trainer.save(run)
    started = [p.name for p in multiprocessing.active_children() if p.pid not in before]
    manager, filesystem_async._results_queue = filesystem_async._results_queue is not None, earlier
    run.stream.close()
    return {"saved": ckpt.latest_step(path.parent), "manager": manager, "children": started}


def test_a_checkpoint_save_starts_no_helper_process(tiny_cfg, tmp_path):
    """Megatron's writer would start a spawned Manager (about 0.5 GB) for its results at the first save,
    which a killed run leaves behind; the saves run in the rank, so no process is started."""
    from vlm_bridge.parallel import run_parallel

    result = run_parallel(_save_and_list_helpers, 1, tiny_cfg(steps=1, output_dir=tmp_path / "run"))
    assert result == {"saved": 1, "manager": False, "children": []}, result
