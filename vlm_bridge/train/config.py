"""Typed run configuration: one dataclass per concern, a recipe returns a ``TrainConfig``.

CLI overrides are dotted ``key=value`` paths (``optim.lr=2e-5``, ``freeze.vision=true``); values
are parsed by the field's declared type, and an unknown key or bad value is a one-line error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ParallelSettings:
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallelism (MoE); experts are split over data-parallel ranks
    cp: int = 1  # context parallelism: every sequence split over cp ranks


@dataclass
class OptimSettings:
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 10
    # After the warmup: "cosine" or "linear" decay to min_lr over the run, "constant" (stays at
    # lr), or "wsd" (warmup-stable-decay: lr, then linear towards min_lr over the last
    # decay_steps). As in Megatron and HF, min_lr is where the rate stands after the last step.
    schedule: str = "cosine"
    decay_steps: int = 0  # wsd only: the final decay's length; 0 = a tenth of the run (at least 1)
    clip_grad: float = 1.0
    # Per-component peak learning rates; None means ``lr``.
    language_lr: float | None = None
    vision_lr: float | None = None
    projector_lr: float | None = None
    # The distributed optimizer shards fp32 master weights over data-parallel ranks (needs
    # reduce-scatter, which gloo lacks: "auto" turns it on with CUDA only).
    distributed_optimizer: str = "auto"
    # Accumulate and reduce gradients in fp32 (safer over many micro-batches; 2 more bytes/param).
    grad_reduce_in_fp32: bool = True
    # Adam's two moments in "fp32" or "bf16" (4 bytes/param less; the update and the master
    # weights stay fp32; see train/low_memory_adam.py for what rounding the moments costs).
    moments: str = "fp32"
    # dtype=fp16 only: the dynamic loss scale's start; 0 = 2**16 / tokens per micro-batch (a power
    # of two, at least 1). The loss is a token sum until the step divides it, so a weight gradient
    # sums a micro-batch's tokens in fp16: Megatron's 2**32 (or torch's 2**16) overflowed every
    # step of a fine-tune's start, each one skipped.
    initial_loss_scale: float = 0.0


@dataclass
class DataSettings:
    # A path (a .jsonl/.json file, a data file, a dataset folder), "jsonl:PATH", "hf:NAME_OR_DIR", a maker
    train: str = ""
    validation: str = ""  # held-out data in the same forms; evaluated every eval.every steps
    seq_len: int = 4096
    pack: bool = True
    # A packed micro-batch ends at the next multiple of this after its longest row's last sample
    # instead of at seq_len (0: always seq_len). Pipeline parallelism always uses seq_len: its
    # stages exchange messages of one fixed shape.
    row_multiple: int = 256
    skip_bad_media: bool = False
    max_samples: int | None = None
    shuffle: bool = True
    # Processes encoding the next samples while the model trains (-1: up to 4 per local GPU on
    # CUDA, none on CPU-only machines, where the cores train; 0: in the rank's own process).
    workers: int = -1


@dataclass
class EvalSettings:
    """Validation during fine-tuning (needs ``data.validation``): loss and perplexity on assistant
    turns, and with ``generate`` the generated answers scored by ``metrics``."""

    every: int = 0  # 0: only after the last step
    generate: bool = False
    metrics: tuple[str, ...] | None = None  # None: exact match (a choice needs generate=true)
    max_new_tokens: int = 32
    max_samples: int | None = None
    batch_size: int = 8


@dataclass
class FreezeSettings:
    """None: the mode's default (train in full fine-tuning, frozen base under PEFT)."""

    language_model: bool | None = None
    vision: bool | None = None
    projector: bool | None = None


@dataclass
class PeftSettings:
    method: str | None = None  # None (full fine-tune), "lora" or "dora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    components: tuple[str, ...] = ("language_model",)


@dataclass
class CheckpointSettings:
    dir: str = ""  # default: <output_dir>/checkpoints
    save_every: int = 0  # 0: only at the end
    resume: bool = True  # resume from the latest checkpoint in dir when there is one
    export_hf: bool = False  # also write an HF export next to each save
    keep_last: int = 0  # keep only this many most recently saved checkpoints (0: all)


@dataclass
class TrainConfig:
    name: str = "custom"
    pretrained: str = ""  # HF folder or vlm-bridge Megatron checkpoint
    output_dir: str = "runs/default"
    dtype: str = "bf16"
    steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seed: int = 1234
    recompute: bool = False  # activation recomputation of every transformer layer
    # Recompute only these components' layers ("vision", "language_model"; implies recompute):
    # with many high-resolution images the vision tower holds most of a step's activations, and
    # recomputing it costs one more ViT forward, not one more forward of the whole model.
    recompute_components: tuple[str, ...] = ()
    # Recompute only the first N layers of each recomputed component on this pipeline stage
    # (0: every layer; implies recompute): memory traded for speed a layer at a time, Megatron's
    # "block" method.
    recompute_layers: int = 0
    # Keep neither pre-norm outputs nor MLP activation outputs between forward and backward: the
    # backward rebuilds each from a tensor kept anyway (the norm's input, linear_fc1's output), one
    # elementwise pass each; bit-exact. For the layers not recomputed whole.
    recompute_elementwise: bool = False
    log_every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "vlm-bridge"
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    freeze: FreezeSettings = field(default_factory=FreezeSettings)
    peft: PeftSettings = field(default_factory=PeftSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


def _parse(value: str, annotation, key: str):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value.lower() in ("none", "null") and type(None) in typing.get_args(annotation):
        return None
    if origin in (typing.Union, __import__("types").UnionType) and args:
        return _parse(value, args[0], key)
    if origin is tuple:
        return tuple(v for v in value.split(",") if v)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"override {key}: {value!r} is not a boolean")
    try:
        return annotation(value)
    except (TypeError, ValueError):
        raise ValueError(f"override {key}: {value!r} is not a valid {annotation.__name__}") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b=value`` overrides in place and return ``cfg``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        target, *path = key.split(".")[::-1]
        obj = cfg
        for part in reversed(path):
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
                raise ValueError(f"unknown config key {key!r}")
            obj = getattr(obj, part)
        hints = typing.get_type_hints(type(obj))
        if target not in hints or dataclasses.is_dataclass(getattr(obj, target)):
            raise ValueError(f"unknown config key {key!r}")
        parsed = _parse(value, hints[target], key)
        allowed = CHOICES.get(key)
        if allowed is not None and parsed not in allowed:
            raise ValueError(f"override {key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        setattr(obj, target, parsed)
    return cfg


# Settings that take one of a few words.
CHOICES = {
    "dtype": ("bf16", "fp16", "fp32"),
    "optim.distributed_optimizer": ("auto", "on", "off"),
    "optim.moments": ("fp32", "bf16"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "peft.method": (None, "lora", "dora"),
}
# Settings that must be at least this (a recipe's values and every override alike).
MINIMUMS = {
    "steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "log_every": 1, "data.seq_len": 1,
    "data.row_multiple": 0, "optim.warmup_steps": 0, "peft.rank": 1, "eval.every": 0,
    "eval.max_new_tokens": 1, "eval.batch_size": 1, "checkpoint.save_every": 0, "recompute_layers": 0,
    "optim.decay_steps": 0, "checkpoint.keep_last": 0, "data.workers": -1, "optim.initial_loss_scale": 0,
}


def check_config(cfg: TrainConfig) -> None:
    """Values no run can use fail here, named by their keys, before any rank starts."""
    for key, low in MINIMUMS.items():
        value = _get(cfg, key)
        if value < low:
            raise ValueError(f"{key} must be >= {low}, got {value}")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(str(a) for a in allowed)}")
    components = [f.name for f in dataclasses.fields(FreezeSettings)]  # the contract's component names
    unknown = [c for c in cfg.recompute_components if c not in components]
    if unknown:
        raise ValueError(f"recompute_components: {', '.join(unknown)} is not a component "
                         f"(one of {', '.join(components)})")
    if cfg.optim.decay_steps and cfg.optim.schedule != "wsd":
        raise ValueError(f"optim.decay_steps={cfg.optim.decay_steps} sets the final decay of "
                         f"optim.schedule=wsd; optim.schedule is {cfg.optim.schedule}")
    if cfg.optim.decay_steps > cfg.steps - min(cfg.optim.warmup_steps, cfg.steps - 1):
        raise ValueError(f"optim.decay_steps={cfg.optim.decay_steps} is longer than the run after its "
                         f"warmup (steps={cfg.steps}, optim.warmup_steps={cfg.optim.warmup_steps})")
    cpus = os.cpu_count() or 1
    if cfg.data.workers > cpus:
        raise ValueError(f"data.workers={cfg.data.workers} is more than this machine's {cpus} CPUs "
                         "(-1: a share of them for each local rank)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ValueError(f"optim.min_lr {cfg.optim.min_lr:g} is above optim.lr {cfg.optim.lr:g}: the rate "
                         "decays from optim.lr down to optim.min_lr; lower optim.min_lr too")
    if cfg.eval.metrics and not cfg.eval.generate:
        raise ValueError(f"eval.metrics={','.join(cfg.eval.metrics)} scores generated answers, and "
                         "eval.generate is false: set eval.generate=true or leave eval.metrics out")
    if cfg.eval.generate and cfg.data.validation and cfg.parallel.cp > 1:
        raise ValueError(f"eval.generate=true: generation does not run with context parallelism "
                         f"(parallel.cp={cfg.parallel.cp}); set eval.generate=false (validation loss "
                         "only) or parallel.cp=1")
    if cfg.eval.metrics:
        from vlm_bridge.inference.metrics import check_metric

        for name in cfg.eval.metrics:  # a metric that cannot score fails before any rank starts
            check_metric(name, "eval.metrics")
    if Path(cfg.output_dir).expanduser().is_file():
        raise ValueError(f"output_dir {cfg.output_dir} is a file; the run writes a folder there")
    if cfg.pretrained and Path(cfg.output_dir).resolve() == Path(cfg.pretrained).resolve():
        raise ValueError(f"output_dir {cfg.output_dir} is the --pretrained model's folder; the run's "
                         "files would overwrite the model's")
    positions = _model_positions(cfg.pretrained) if cfg.pretrained else None
    if positions and cfg.data.seq_len > positions:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} is more than the model's {positions} positions "
                         "(max_position_embeddings); lower data.seq_len")
    from vlm_bridge.data.sources import check_source, refuse_output_over_source

    for key in ("data.train", "data.validation"):  # a path that is not there: before a model loads
        if _get(cfg, key):
            check_source(_get(cfg, key), key)
            refuse_output_over_source(cfg.output_dir, "output_dir", _get(cfg, key), key)


def _model_positions(pretrained: str) -> int | None:
    """The text model's ``max_position_embeddings`` of a local HF folder or checkpoint (its
    ``hf/``); None where it cannot be read here (the loader names what is wrong later)."""
    from vlm_bridge.inference.command import resolve_pretrained
    from vlm_bridge.loading import load_hf_config

    try:
        folder = Path(resolve_pretrained(pretrained)).expanduser()
    except FileNotFoundError:
        return None
    for candidate in (folder, folder / "hf"):
        if (candidate / "config.json").is_file():
            try:
                config = load_hf_config(str(candidate))
            except Exception:  # noqa: BLE001 - only a pre-check: loading reports it properly
                return None
            return getattr(config.get_text_config(), "max_position_embeddings", None)
    return None


def initial_loss_scale(cfg: TrainConfig) -> float:
    """fp16's first loss scale: the setting, or 2**16 over the tokens of a micro-batch (floored to a
    power of two, at least 1), so that a weight gradient summed over those tokens stays in range."""
    if cfg.optim.initial_loss_scale:
        return cfg.optim.initial_loss_scale
    tokens = cfg.micro_batch_size * cfg.data.seq_len
    return float(2 ** max(0, 16 - math.ceil(math.log2(tokens))))


def _get(cfg: TrainConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
