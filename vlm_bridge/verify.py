"""Parity check: HF and Megatron on the same processed inputs, with a per-layer divergence report.

The HF processor (chat template, image/video preprocessing) builds one padded batch: a row with the
given images, a row with the video, and a text-only row. HF runs it on rank 0; Megatron runs it at
the requested TP/PP through the pipeline schedule. Logits are compared over real (non-padding)
tokens; language-model layer outputs and vision-tower outputs are compared too, so a mismatch is
located at the first module that diverges.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlm_bridge.attention.context import context_parallel_size, current_split
from vlm_bridge.compat.tf32 import matmul_tf32, set_matmul_tf32
from vlm_bridge.convert.engine import DTYPES
from vlm_bridge.convert.hf_io import CheckpointError
from vlm_bridge.data.media import load_image, load_video
from vlm_bridge.inference.requests import build_prompt_batch, request_from_args
from vlm_bridge.loading import load_hf, load_hf_config, load_hf_model, load_megatron, load_processor
from vlm_bridge.parallel import ParallelConfig, cpu_group, device, init_distributed
from vlm_bridge.registry import family_for_config
from vlm_bridge.runtime import last_stage_rank, pipeline_forward_logits, to_rank0

DEFAULT_PROMPT = "Describe what you see."


@dataclass
class VerifyReport:
    max_abs_diff: float
    mean_abs_diff: float
    kl_divergence: float
    top1_agreement: float
    tokens: int
    dtype: str
    tolerance: float
    passed: bool
    vision_max_abs_diff: float | None = None
    layer_max_abs_diff: list[float] = field(default_factory=list)
    first_divergent_layer: int | None = None
    fp32_baseline: dict | None = None
    # the sides whose logits hold nan or inf (a NaN in the weights, an overflow): diffs say nothing
    nonfinite_logits: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def default_tolerance(dtype: torch.dtype) -> float:
    """Max-abs logit diff allowed: fp32 must match closely; half precision by distribution."""
    return 1e-3 if dtype == torch.float32 else 0.5


def load_media(images: list[str], video: str | None, processor):
    """RGB PIL images, and the video (a file decoded as ``processor`` samples it, or a folder of
    frame images) as frames + metadata + processor kwargs."""
    pil = [load_image(path) for path in images]
    if video is not None and not Path(video).exists():
        raise ValueError(f"video {video} does not exist")
    return pil, load_video(video, processor) if video is not None else None


def default_media():
    """Generated media so that verify always exercises the vision path."""
    from vlm_bridge.testing.media import make_image, make_video_frames

    return [make_image(224, 168, seed=1), make_image(112, 224, seed=2)], make_video_frames(
        4, 112, 112, seed=3
    )


def verify_batches(family, processor, images, video, prompt: str, fps: float = 2.0,
                   **processor_kwargs) -> list:
    """The batches verify compares: one with every row, or, for a family whose HF processor takes
    a video only as a prompt of its own (``family.video_batch_alone``), images + text, then the
    video alone."""
    if video is None or not family.video_batch_alone:
        return [build_batch(processor, images, video, prompt, fps, **processor_kwargs)]
    return [build_batch(processor, images, None, prompt, fps, **processor_kwargs),
            build_batch(processor, [], video, prompt, fps, text_row=False, **processor_kwargs)]


def build_batch(processor, images, video, prompt: str, fps: float = 2.0, text_row: bool = True,
                **processor_kwargs):
    """Rows: images (if any), video (if any: frames taken at ``fps``, or a decoded file), text only
    (unless ``text_row`` is False); left-padded like HF generation (``build_prompt_batch``)."""
    requests = []
    if images:
        requests.append(request_from_args(prompt, list(images), None))
    if video is not None:
        requests.append(request_from_args(prompt, [], video))
    if text_row:
        requests.append(request_from_args(prompt, [], None))
    return build_prompt_batch(processor, requests, fps, **processor_kwargs)


def compare_logits(hf: torch.Tensor, mg: torch.Tensor, valid: torch.Tensor) -> dict:
    hf, mg = hf[valid].float(), mg[valid].float()
    diff = (hf - mg).abs()
    kl = F.kl_div(F.log_softmax(mg, -1), F.log_softmax(hf, -1), log_target=True, reduction="none")
    return dict(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        kl_divergence=max(float(kl.sum(-1).mean()), 0.0),  # rounding can go a hair below 0
        top1_agreement=float((hf.argmax(-1) == mg.argmax(-1)).float().mean()),
        tokens=int(valid.sum()),
    )


def _capture_megatron(built) -> dict:
    """Hooks recording each decoder layer's output ``[s, b, h]`` and the vision tower output."""
    store: dict = {"layers": {}, "vision": [], "handles": []}
    model = built.model
    for layer in model.language_model.decoder.layers:
        idx = layer.layer_number - 1
        # The layer's own output; additions after it (DeepStack) are not part of it, as in HF's
        # hidden_states.
        store["handles"].append(layer.register_forward_hook(
            lambda m, i, o, idx=idx: store["layers"].__setitem__(idx, _whole_sequence(o[0].detach()))
        ))
    # HF's last hidden state is the final norm's output: record ours too (last stage only).
    final_norm = getattr(model.language_model.decoder, "final_layernorm", None)
    if final_norm is not None:
        store["handles"].append(final_norm.register_forward_hook(
            lambda m, i, o: store["layers"].__setitem__("final", _whole_sequence(o.detach()))))
    if model.vision is not None:
        # Some towers also return extra features (DeepStack): compare what goes into the sequence.
        def record(output) -> None:
            store["vision"].append(_vision_features(output).detach().cpu())

        if context_parallel_size() == 1:
            store["handles"].append(model.vision.register_forward_hook(lambda m, i, o: record(o)))
        else:  # each CP rank encodes a share of the media: record the features gathered for all
            store["handles"].append(_RecordedCall(model, "encode_vision", record))
    return store


class _RecordedCall:
    """Hands every return value of ``owner.name(...)`` to ``record`` until :meth:`remove`."""

    def __init__(self, owner, name: str, record) -> None:
        self.owner, self.name = owner, name
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            record(out)
            return out

        setattr(owner, name, recorded)

    def remove(self) -> None:
        delattr(self.owner, self.name)  # the instance attribute: the class's method shows again


def _whole_sequence(hidden: torch.Tensor) -> torch.Tensor:
    """A layer output ``[s, b, h]`` over the whole (padded) sequence: context-parallel ranks hold
    two chunks each."""
    cp = context_parallel_size()
    if cp == 1:
        return hidden.clone()
    return current_split(hidden.shape[0] * cp).gather(hidden, 0)


class ReferenceLoadError(CheckpointError):
    """transformers could not load the HF reference completely (it would re-initialise weights)."""


def load_hf_reference(hf_dir: str, dtype: torch.dtype):
    """The HF model, refusing a partial load: transformers fills missing or mismatched weights with
    random values and only logs it, which would make any comparison blame the conversion. Stored
    tensors the family declares non-weights (``Family.passthrough``) may go unused."""
    model, info = load_hf_model(hf_dir, dtype=dtype, output_loading_info=True)
    constants = family_for_config(model.config).passthrough
    info["unexpected_keys"] = {k for k in info.get("unexpected_keys", ())
                               if not any(re.search(pattern, k) for pattern in constants)}
    problems = [f"{len(info[k])} {k.replace('_', ' ')} ({', '.join(sorted(map(str, info[k]))[:3])})"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems:
        raise ReferenceLoadError(
            f"{hf_dir}: transformers did not load the HF model completely: {'; '.join(problems)}; "
            "the HF side would run with re-initialised weights, so no comparison was made"
        )
    return model


def _vision_features(output) -> torch.Tensor:
    """The tensor a vision module hands the language model, whatever container it returns."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    return output[0]


def _run_hf(hf_dir: str, dtype: torch.dtype, batches: list, vision_module: str) -> list[tuple]:
    """``(logits, hidden states, vision features)`` of the HF model for each batch."""
    model = load_hf_reference(hf_dir, dtype)
    model.to(device())
    model.eval()
    vision_out: list = []
    try:
        visual = operator.attrgetter(vision_module)(model)
    except AttributeError:
        visual = None
    if visual is not None:
        visual.register_forward_hook(lambda m, i, o: vision_out.append(_vision_features(o).detach()))
    runs = []
    with torch.no_grad():
        for batch in batches:
            vision_out.clear()
            out = model(**batch, output_hidden_states=True)
            runs.append((out.logits, list(out.hidden_states), list(vision_out)))
    del model  # the caller may load another copy (fp32 baseline)
    return runs


def _verify(
    hf_dir: str,
    megatron_dir: str | None,
    parallel: ParallelConfig,
    images: list[str],
    video: str | None,
    prompt: str,
    dtype_arg: str | None,
    tolerance: float | None,
    fp32_baseline: bool = False,
    processor_kwargs: dict | None = None,
) -> dict:
    """Run on every rank; rank 0 returns the report as a dict.

    Families without video (``"video" not in family.modalities``) get no video row; asking for a
    video explicitly is then an error.

    With ``fp32_baseline`` and a half-precision dtype, HF also runs in fp32 and both half-precision
    models are compared with it: Megatron passes when its distance to the fp32 reference is within
    the noise of HF's own half-precision run (random weights make many near-ties in argmax, so a
    direct half-vs-half comparison alone understates parity).
    """
    init_distributed(parallel)
    # Inputs first: a bad image path must fail before minutes of model loading.
    family = family_for_config(load_hf_config(hf_dir))
    if video is not None and "video" not in family.modalities:
        raise ValueError(f"--video: the {family.name} family takes no video input")
    processor = load_processor(hf_dir)
    pil, frames = load_media(images, video, processor) if (images or video) else default_media()
    if megatron_dir:
        check_same_model(hf_dir, megatron_dir)
        built, meta = load_megatron(megatron_dir, parallel, DTYPES[dtype_arg] if dtype_arg else None)
        dtype = DTYPES[dtype_arg or meta["dtype"]]
    else:
        dtype = DTYPES[dtype_arg] if dtype_arg else torch.float32
        built = load_hf(hf_dir, parallel, dtype)
    built.model.eval()
    if dtype == torch.float32:
        # An fp32 check means fp32: TF32 matmuls and convolutions (HF's patch Conv) would add
        # ~1e-3 noise on GPUs on one side only. Restored by verify() on the way out.
        set_matmul_tf32(False)
        torch.backends.cudnn.allow_tf32 = False
    if "video" not in built.family.modalities:
        frames = None
    batches = [b.to(device()) for b in
               verify_batches(built.family, processor, pil, frames, prompt, **(processor_kwargs or {}))]
    runs = []  # per batch: (valid mask, Megatron logits, decoder layer outputs, vision features)
    for batch in batches:
        store = _capture_megatron(built)
        logits = pipeline_forward_logits(built.model, built.family.model_inputs(built.settings, dict(batch)))
        mg_logits = to_rank0(logits[..., :built.settings.vocab_size] if logits is not None else None,
                             last_stage_rank())
        runs.append((batch["attention_mask"].bool().cpu(), mg_logits, _gather_layers(store["layers"]),
                     store["vision"]))
        for handle in store["handles"]:
            handle.remove()
    if dist.get_rank() != 0:
        return {}
    hf_runs = _run_hf(hf_dir, dtype, batches, built.family.hf_vision_module)
    tol = tolerance if tolerance is not None else default_tolerance(dtype)
    hf_rows = torch.cat([hf_logits.cpu()[valid] for (valid, *_), (hf_logits, _, _) in zip(runs, hf_runs)])
    mg_rows = torch.cat([mg[valid] for valid, mg, _, _ in runs])
    everywhere = torch.ones(len(hf_rows), dtype=torch.bool)
    stats = compare_logits(hf_rows, mg_rows, everywhere)
    per_batch = [_layer_diffs(run, [h.cpu() for h in hf_hidden])
                 for run, (_, hf_hidden, _) in zip(runs, hf_runs)]
    layer_diffs = [max(d) for d in zip(*per_batch)]
    vision_diffs = [
        float((a.float().reshape(-1, a.shape[-1]) - b.cpu().float().reshape(-1, b.shape[-1])).abs().max())
        for (_, _, _, mine), (_, _, theirs) in zip(runs, hf_runs) for a, b in zip(mine, theirs)
    ]
    vision_diff = max(vision_diffs) if vision_diffs else None
    first_bad = next((i for i, d in enumerate(layer_diffs) if not d <= tol), None)  # nan counts
    passed = stats["max_abs_diff"] <= tol and stats["top1_agreement"] >= (
        1.0 if dtype == torch.float32 else 0.9
    )
    baseline = None
    if fp32_baseline and dtype != torch.float32:
        hf_half = [([h.cpu() for h in hidden], [v.cpu() for v in vision]) for _, hidden, vision in hf_runs]
        del hf_runs
        ref_runs = _run_hf(hf_dir, torch.float32, batches, built.family.hf_vision_module)
        ref_rows = torch.cat([ref.cpu()[valid] for (valid, *_), (ref, _, _) in zip(runs, ref_runs)])
        baseline = {
            "hf_half_vs_hf_fp32": compare_logits(ref_rows, hf_rows, everywhere),
            "megatron_half_vs_hf_fp32": compare_logits(ref_rows, mg_rows, everywhere),
            # Where each half-precision model's error comes from: the vision features and every
            # decoder layer's output, as RMS distance to the fp32 reference.
            "rms_error_vs_hf_fp32": _rms_errors(runs, hf_half, ref_runs),
        }
        hf_kl = baseline["hf_half_vs_hf_fp32"]["kl_divergence"]
        mg_kl = baseline["megatron_half_vs_hf_fp32"]["kl_divergence"]
        passed = mg_kl <= 1.5 * hf_kl + 1e-4
    report = VerifyReport(
        **stats, dtype=str(dtype).removeprefix("torch."), tolerance=tol, passed=passed,
        vision_max_abs_diff=vision_diff, layer_max_abs_diff=layer_diffs,
        first_divergent_layer=first_bad, fp32_baseline=baseline,
        nonfinite_logits=[side for side, rows in (("HF", hf_rows), ("Megatron", mg_rows))
                          if not bool(torch.isfinite(rows).all())],
    )
    return report.to_dict()


def _shape_fields(config: dict, prefix: str = "") -> dict[str, int]:
    """Every integer field of a config and its sub-configs (sizes, counts, windows), token ids
    left out: two folders of one model agree on all of them."""
    fields = {}
    for key, value in config.items():
        if isinstance(value, dict):
            fields.update(_shape_fields(value, f"{prefix}{key}."))
        elif isinstance(value, int) and not isinstance(value, bool) and "token" not in key:
            fields[prefix + key] = value
    return fields


def check_same_model(hf_dir: str, megatron_dir: str) -> None:
    """A Megatron checkpoint compared with an HF folder of another model would fail somewhere in
    the forward with a shape error; say which config field differs instead."""
    saved = Path(megatron_dir) / "hf"
    if not (saved / "config.json").is_file():
        return  # the loader reports the missing folder
    ours, theirs = load_hf_config(hf_dir), load_hf_config(saved)
    kind = (family_for_config(ours).name, family_for_config(theirs).name)
    if kind[0] != kind[1]:
        raise CheckpointError(f"--megatron-path {megatron_dir} holds a {kind[1]} model, --hf-model "
                              f"{hf_dir} a {kind[0]} model")
    a, b = _shape_fields(ours.to_dict()), _shape_fields(theirs.to_dict())
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            raise CheckpointError(f"--megatron-path {megatron_dir} is not a conversion of --hf-model "
                                  f"{hf_dir}: config {key} is {b[key]} in the checkpoint, {a[key]} in the "
                                  f"HF folder")


def verify(*args, **kwargs) -> dict:
    """See :func:`_verify`; TF32 settings are put back afterwards (verify may switch them off)."""
    saved_conv = torch.backends.cudnn.allow_tf32
    try:
        with matmul_tf32(None):
            return _verify(*args, **kwargs)
    finally:
        torch.backends.cudnn.allow_tf32 = saved_conv


def _gather_layers(local: dict) -> dict:
    from megatron.core import parallel_state

    mine = local if parallel_state.get_tensor_model_parallel_rank() == 0 else {}
    everyone: list = [None] * dist.get_world_size()
    mine = {k: v.cpu() for k, v in mine.items()}
    dist.all_gather_object(everyone, mine, group=cpu_group())
    merged: dict = {}
    for part in everyone:
        merged.update(part or {})
    return merged


def _layer_diffs(run: tuple, hf_hidden: list) -> list[float]:
    """Max abs diff per decoder layer (the last one after the final norm, as HF reports it)."""
    valid = run[0]
    mine, _ = _megatron_side(run)
    return [float((a[valid].float() - b[valid].float()).abs().max())
            for a, b in zip(mine[1:], hf_hidden[1:], strict=True)]


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def _rms_errors(runs: list, hf_half: list, ref_runs: list) -> dict:
    """RMS distance to the fp32 reference of the vision features and of each decoder layer's
    output (valid tokens), for HF and Megatron in half precision, maxed over the batches."""
    out: dict = {}
    sides = {"hf_half": lambda i: hf_half[i], "megatron_half": lambda i: _megatron_side(runs[i])}
    for name, pick in sides.items():
        layers: list[float] = []
        vision: list[float] = []
        for i, (valid, *_rest) in enumerate(runs):
            hidden, feats = pick(i)
            _, ref_hidden, ref_vision = ref_runs[i]
            errors = [_rms(h[valid], r.cpu()[valid]) for h, r in zip(hidden[1:], ref_hidden[1:], strict=True)]
            layers = [max(a, b) for a, b in zip(layers, errors)] if layers else errors
            vision += [_rms(a.reshape(-1, a.shape[-1]), b.cpu().reshape(-1, b.shape[-1]))
                       for a, b in zip(feats, ref_vision)]
        out[name] = {"vision": max(vision) if vision else None, "layers": layers}
    return out


def _megatron_side(run: tuple) -> tuple[list, list]:
    """Megatron's layer outputs as HF hidden states ``[b, s, h]`` (index 0, the embeddings, unused;
    the last layer's output after the final norm), and its vision."""
    valid, _, layers, vision = run
    count = len(layers) - 1  # decoder layers; the final norm's output is under "final"
    outputs = [layers[i] for i in range(count - 1)] + [layers["final"]]
    return [None] + [h[: valid.shape[1]].transpose(0, 1) for h in outputs], vision


def format_report(r: dict) -> str:
    lines = [
        f"tokens compared      {r['tokens']} ({r['dtype']})",
        f"max |logit diff|     {r['max_abs_diff']:.3e}   (tolerance {r['tolerance']:.1e})",
        f"mean |logit diff|    {r['mean_abs_diff']:.3e}",
        f"KL(HF || Megatron)   {r['kl_divergence']:.3e}",
        f"top-1 agreement      {100 * r['top1_agreement']:.2f}%",
    ]
    if r.get("vision_max_abs_diff") is not None:
        lines.append(f"vision tower diff    {r['vision_max_abs_diff']:.3e}")
    per_layer = ", ".join(f"{d:.1e}" for d in r["layer_max_abs_diff"])
    lines.append(f"per-layer max diff   [{per_layer}]")
    first, vision = r["first_divergent_layer"], r.get("vision_max_abs_diff")
    if vision is not None and vision != vision:  # nan from the vision tower on: the layers follow
        where = "vision tower (nan)"
    else:
        where = "none" if first is None else f"decoder layer {first}"
    lines.append(f"first divergence     {where}")
    if r.get("nonfinite_logits"):
        lines.append(f"non-finite logits    {' and '.join(r['nonfinite_logits'])} (nan or inf: check the "
                     "weights, or the dtype's range)")
    if r.get("fp32_baseline"):
        for name, b in r["fp32_baseline"].items():
            if name == "rms_error_vs_hf_fp32":
                for side, e in b.items():
                    vision = "-" if e["vision"] is None else f"{e['vision']:.2e}"
                    layers = ", ".join(f"{x:.1e}" for x in e["layers"])
                    lines.append(f"{side} RMS error vs fp32: vision {vision}, layers [{layers}]")
                continue
            lines.append(f"{name:<26} KL {b['kl_divergence']:.3e}  top-1 {100 * b['top1_agreement']:.2f}%"
                         f"  max diff {b['max_abs_diff']:.3e}")
    lines.append("PASS" if r["passed"] else "FAIL")
    return "\n".join(lines)
