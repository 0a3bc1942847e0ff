"""Nemotron VL specifics beyond the per-family tests (tests/families): both key layouts, the
original V2 hub form and MoE checkpoints (per-expert and fused, the router kept in fp32 in bf16
files) round-trip bit-exactly (sharded and single-file, bf16 and fp32, through
TP=2), the dt clamp matters (parity does not pass by accident), LoRA on the Mamba projections
exports as an HF-PEFT adapter at TP=2, and unsupported inputs fail with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vlm_bridge.parallel import ParallelConfig, run_parallel
from vlm_bridge.testing.checks import checkpoint_mismatches, write_hf_weights

TOL = 1e-4


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    from vlm_bridge.testing.tiny_nemotron_vl import build_tiny_nemotron_vl

    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("nemotron") / "hf")


@pytest.fixture(scope="module")
def nemotron_native(tmp_path_factory):
    from vlm_bridge.testing.tiny_nemotron_vl import build_tiny_nemotron_vl

    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("nemotron_native") / "hf", key_format="native")


@pytest.fixture(scope="module")
def nemotron_moe(tmp_path_factory):
    from vlm_bridge.testing.tiny_nemotron_vl import build_tiny_nemotron_vl

    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("nemotron_moe") / "hf", moe=True)


@pytest.fixture(scope="module")
def nemotron_moe_native(tmp_path_factory):
    """MoE with the experts fused as transformers keeps them: up_proj [E, I, H], down_proj [E, H, I]."""
    from vlm_bridge.testing.tiny_nemotron_vl import build_tiny_nemotron_vl

    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("nemotron_moe_native") / "hf", moe=True,
                                  key_format="native")


@pytest.fixture(scope="module")
def shapes_jsonl(tmp_path_factory):
    from vlm_bridge.testing.shapes_task import make_task

    return make_task(tmp_path_factory.mktemp("shapes"), n_train=8, n_eval=2, size=56)["train"]


# What transformers keeps in fp32 whatever the model's dtype (NemotronH's _keep_in_fp32_modules_strict).
KEPT_FP32 = (".gate.weight", ".e_score_correction_bias")


def _resave(src, dst, dtype: torch.dtype, sharded: bool):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(KEPT_FP32) else v
               for k, v in load_file(src / "model.safetensors").items()}
    write_hf_weights(tensors, dst, sharded)
    return dst


@pytest.mark.parametrize("form,layout", [("nemotron", "v2"), ("nemotron_native", "native"),
                                         ("nemotron_v2", "v2"), ("nemotron_moe", "v2"),
                                         ("nemotron_moe_native", "native")])
@pytest.mark.parametrize("dtype,sharded", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-single", "bf16-sharded"])
def test_both_layouts_round_trip_bit_exact_through_tp2(request, run_cli, tmp_path, form, layout, dtype,
                                                       sharded):
    src = _resave(request.getfixturevalue(form), tmp_path / "src", dtype, sharded)
    meg, out = tmp_path / "meg", tmp_path / "out"
    assert run_cli("import", "--hf-model", src, "--megatron-path", meg, "--tp", "2") == 0
    meta = json.loads((meg / "vlm_bridge.json").read_text())
    assert meta["key_layout"] == layout and "summary_idxs" in "".join(meta["passthrough"])
    assert run_cli("export", "--megatron-path", meg, "--hf-path", out, "--pp", "2") == 0
    assert checkpoint_mismatches(src, out) == []


def test_native_layout_matches_hf(nemotron_native, parity):
    report = parity(nemotron_native, None, tp=2)
    assert report["max_abs_diff"] <= TOL and report["top1_agreement"] == 1.0, report
    assert report["vision_max_abs_diff"] <= TOL, report


def _clamp_ablation(hf_dir: str) -> dict:
    import dataclasses

    from vlm_bridge.families._common.mamba import MambaMixer
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.testing.checks import hf_logits, image_batch

    built, batch, kwargs = image_batch(hf_dir)
    vocab = built.settings.vocab_size
    out = {"full": pipeline_forward_logits(built.model, kwargs)[..., :vocab]}
    mixers = [m for m in built.model.modules() if isinstance(m, MambaMixer)]
    for m in mixers:
        m.settings = dataclasses.replace(m.settings, time_step_min=0.0)
    out["no_clamp"] = pipeline_forward_logits(built.model, kwargs)[..., :vocab]
    out["hf"] = hf_logits(hf_dir, batch)
    out["valid"] = batch["attention_mask"].bool()
    out["tokens"], out["chunk"] = int(batch["input_ids"].shape[1]), mixers[0].settings.chunk_size
    return out


def test_dt_clamp_matters_and_the_scan_crosses_chunks(nemotron):
    r = run_parallel(_clamp_ablation, 1, str(nemotron))
    valid = r["valid"]
    assert r["tokens"] > 4 * r["chunk"]
    assert float((r["full"][valid] - r["hf"][valid]).abs().max()) <= TOL
    assert float((r["no_clamp"][valid] - r["hf"][valid]).abs().max()) > 1e-3, "the dt clamp had no effect"


def _mamba_lora(hf_dir: str, out_dir: str, dora: bool):
    from transformers import AutoProcessor

    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.peft import LoraConfig, apply_lora, export_hf_peft
    from vlm_bridge.peft.lora import randomize_adapters_
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    parallel = ParallelConfig(tp=2)
    init_distributed(parallel)
    built = load_hf(hf_dir, parallel, torch.float32)
    built.model.eval()
    wrapped = apply_lora(built.model, LoraConfig(rank=4, alpha=8.0, targets=("in_proj", "out_proj"),
                                                 use_dora=dora))
    randomize_adapters_(built.model, seed=3, std=0.1)
    export_hf_peft(built, out_dir, hf_dir)
    images, _ = default_media()
    batch = build_batch(AutoProcessor.from_pretrained(hf_dir), images, None, DEFAULT_PROMPT)
    logits = pipeline_forward_logits(built.model, built.family.model_inputs(built.settings, dict(batch)))
    return logits[..., : built.settings.vocab_size], wrapped


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_on_mamba_projections_exports_at_tp2(nemotron, tmp_path, dora):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    out = tmp_path / "adapter"
    mg, wrapped = run_parallel(_mamba_lora, 2, str(nemotron), str(out), dora)
    assert {w.rsplit(".", 1)[1] for w in wrapped} == {"in_proj", "out_proj"}
    images, _ = default_media()
    batch = build_batch(AutoProcessor.from_pretrained(nemotron), images, None, DEFAULT_PROMPT)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(nemotron), out).eval()
    with torch.no_grad():
        with_adapter = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    valid = batch["attention_mask"].bool()
    assert float((with_adapter[valid] - base[valid]).abs().max()) > 1e-2
    assert float((with_adapter[valid] - mg[valid]).abs().max()) <= TOL


def _edit_config(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("folder,edit,args,message", [
    ("nemotron", lambda c: c.update(audio_config={}), (), "audio tower (audio_config) is not supported"),
    ("nemotron", lambda c: c["text_config"].update(n_groups=1), ("--tp", "2"),
     "--tp 2 does not divide the Mamba groups (1)"),
    ("nemotron", lambda c: None, ("--ep", "2"), "--ep 2 needs a mixture-of-experts model"),
    ("nemotron", lambda c: c["text_config"]["layers_block_type"].__setitem__(1, "linear_attention_v3"), (),
     "config.json: Class validation error"),
    ("nemotron_moe", lambda c: c["text_config"].update(moe_latent_size=16), (),
     "latent projection (moe_latent_size) is not supported"),
    ("nemotron_moe", lambda c: c["text_config"].update(norm_topk_prob=False), (),
     "norm_topk_prob false is not supported"),
    ("nemotron_moe", lambda c: None, ("--ep", "3"), "--ep 3 does not divide the MoE experts (4)"),
], ids=["audio", "mamba-groups", "ep-dense", "layer-symbol", "moe-latent", "moe-unnormalised", "moe-ep"])
def test_unsupported_inputs_fail_with_one_line(request, run_cli, capsys, tmp_path, folder, edit, args,
                                               message):
    folder = _edit_config(request.getfixturevalue(folder), tmp_path / "edited", edit)
    capsys.readouterr()  # building the fixture's folder may have printed progress
    assert run_cli("import", "--hf-model", folder, "--megatron-path", tmp_path / "meg", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "meg").exists()


def _expert_bias_matters(hf_dir: str) -> dict:
    """The tiny MoE's e_score_correction_bias (randomised) changes which experts are picked: with it
    zeroed on the Megatron side the logits leave HF's, so MoE parity does not pass by accident."""
    from vlm_bridge.loading import load_hf
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.testing.checks import hf_logits, image_batch

    built, batch, inputs = image_batch(hf_dir)
    valid = batch["attention_mask"].bool()  # left padding: HF's logits there are not compared
    ref = hf_logits(hf_dir, batch)[valid]

    def diff() -> float:
        with torch.no_grad():
            ours = pipeline_forward_logits(built.model, inputs)
        return float((ours[..., : built.settings.vocab_size][valid] - ref).abs().max())

    biases = [p for n, p in built.params.items() if n.endswith("router.expert_bias")]
    matched = diff()
    for bias in biases:
        bias.zero_()
    zeroed = diff()
    half = load_hf(hf_dir, ParallelConfig(), torch.bfloat16).params  # the router stays fp32 there
    router = ("router.weight", "expert_bias")
    dtypes = sorted({str(p.dtype) for n, p in half.items() if n.endswith(router)})
    others = sorted({str(p.dtype) for n, p in half.items() if not n.endswith(router)})
    return {"matched": matched, "zeroed": zeroed, "biases": len(biases), "dtypes": dtypes, "others": others}


def test_moe_expert_bias_routes_and_parity_is_not_by_accident(nemotron_moe):
    r = run_parallel(_expert_bias_matters, 1, str(nemotron_moe))
    assert r["biases"] == 3 and r["dtypes"] == ["torch.float32"] and r["others"] == ["torch.bfloat16"], r
    assert r["matched"] <= TOL and r["zeroed"] > 1e-2, r


def test_mamba_lora_training_at_tp2_exports_at_tp1(nemotron, shapes_jsonl, tmp_path, run_cli):
    """The family's LoRA targets (Mamba projections included) train at TP=2; the checkpoint (in_proj
    adapters saved per part) folds into the weights at TP=1 exactly as its HF-PEFT adapter does."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vlm_bridge.families.nemotron_vl.recipes import LORA_TARGETS
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides
    from vlm_bridge.train.trainer import train

    cfg = apply_overrides(get_recipe("demo_tiny"), [
        "steps=2", "global_batch_size=4", "micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=5e-2",
        "peft.method=lora", f"peft.targets={','.join(LORA_TARGETS)}", "parallel.tp=2",
        "checkpoint.export_hf=true",
    ])
    cfg.pretrained, cfg.output_dir = str(nemotron), str(tmp_path / "run")
    cfg.data.train = f"jsonl:{shapes_jsonl}"
    result = run_parallel(train, 2, cfg)
    assert len(result["losses"]) == 2 and all(map(torch.isfinite, torch.tensor(result["losses"])))
    it = tmp_path / "run" / "checkpoints" / "iter_0000002"
    out, adapter = tmp_path / "merged", it / "hf_peft_adapter"
    assert run_cli("export", "--megatron-path", it, "--hf-path", out, "--tp", "1") == 0
    moved = {k for k, v in load_file(adapter / "adapter_model.safetensors").items()
             if "lora_B" in k and v.abs().max() > 0}
    assert any("mixer.in_proj" in k for k in moved) and any("mixer.out_proj" in k for k in moved)
    merged = AutoModelForImageTextToText.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(nemotron), adapter)
    ids = torch.tensor([[1, 5, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max()
    assert diff < TOL


def _videos_of_two_sizes(hf_dir: str) -> dict:
    """Two video samples of different frame sizes packed into one row: each sample's logits equal
    those of the sample alone (the tower takes the videos one by one)."""
    from transformers import AutoProcessor

    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.testing.media import make_video_frames
    from vlm_bridge.train.batching import collate_packed

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    built.model.eval()
    encoder = SampleEncoder(AutoProcessor.from_pretrained(hf_dir), 4096)
    samples = [encoder.encode({"messages": [
        {"role": "user", "content": [{"type": "video", "video": make_video_frames(4, w, h, seed=w)},
                                     {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": "A square."}]}) for w, h in ((112, 112), (160, 96))]

    def logits(rows):
        mb = collate_packed([rows], built.family, built.settings, sum(len(s) for s in rows), 0)
        return pipeline_forward_logits(built.model, mb.inputs)[0]

    packed = logits(samples)
    alone = [logits([s]) for s in samples]
    return {"shapes": [tuple(s.media["pixel_values_videos"].shape) for s in samples],
            "diff": max(float((packed[a:a + len(s)] - one).abs().max())
                        for a, s, one in zip((0, len(samples[0])), samples, alone))}


def test_videos_of_different_sizes_share_a_packed_row(nemotron):
    result = run_parallel(_videos_of_two_sizes, 1, str(nemotron))
    assert result["shapes"][0][-2:] != result["shapes"][1][-2:]
    assert result["diff"] <= 1e-5


def test_an_over_long_sample_is_skipped_and_counted_not_fatal(nemotron):
    """This family's processor output has per-image patch grids that truncation cannot cut
    between: a sample longer than data.seq_len is skipped as too long, as one that cannot fit."""
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_bridge.data.encode import SampleEncoder

    encoder = SampleEncoder(AutoProcessor.from_pretrained(nemotron), max_seq_len=64)
    sample = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (96, 96), "red")},
                                     {"type": "text", "text": "Describe. " + "word " * 200}]},
        {"role": "assistant", "content": "Red."}]}
    assert encoder.encode(sample, "sample 0") is None
    assert encoder.stats["too_long"] == 1


def test_images_and_videos_in_one_file_train_and_evaluate(nemotron, tmp_path, run_cli):
    """The model takes images and video only in separate batches: packing keeps them in separate
    rows and micro-batches (two rows each here: a step gets a micro-batch more where images give
    way to video), and the evaluation loss pass in separate batches."""
    from vlm_bridge.testing.media import make_image, make_video_frames, save_video_frames

    make_image(64, 48, seed=0).save(tmp_path / "a.png")
    save_video_frames(make_video_frames(4, 64, 48, seed=1), tmp_path / "clip")
    rows = []
    for i in range(6):
        media = {"type": "video", "video": "clip"} if i % 2 else {"type": "image", "image": "a.png"}
        question = {"role": "user", "content": [media, {"type": "text", "text": f"What {i}?"}]}
        rows.append({"messages": [question, {"role": "assistant", "content": f"Thing {i}."}]})
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("evaluate", "--hf-model", nemotron, "--data", data, "--no-generate",
                   "--report", tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["loss_samples"] == 6
    assert run_cli("finetune", "--recipe", "demo_tiny", "--pretrained", nemotron, f"data.train=jsonl:{data}",
                   f"output_dir={tmp_path / 'run'}", "steps=2", "global_batch_size=4", "micro_batch_size=2",
                   "checkpoint.save_every=0", "data.seq_len=4096") == 0
