"""The training loop on Megatron-Core: setup, train_step, save; every feature is a visible line.

Runs on every rank (``vlm-bridge finetune`` launches the ranks or runs under torchrun). Megatron
provides the DDP grad buffers, the (distributed) optimizer with fp32 master weights, the LR
scheduler and the pipeline schedules; the loss is a per-token mean over all loss tokens of the
global batch (``calculate_per_token_loss``), so packing and micro-batching do not change it.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from vlm_bridge.attention.context import padded_length
from vlm_bridge.compat.cpu import cuda_available
from vlm_bridge.compat.distopt_state import keep_unsaved_optimizer_keys
from vlm_bridge.compat.multi_tensor import use_foreach_multi_tensor_ops
from vlm_bridge.convert.engine import DTYPES, dtype_name
from vlm_bridge.loading import conversion_meta, load_pretrained
from vlm_bridge.parallel import ParallelConfig, device, init_distributed, raise_if_stopped
from vlm_bridge.train import checkpoint as ckpt
from vlm_bridge.train import decoupled_grads
from vlm_bridge.train.config import TrainConfig, check_config, initial_loss_scale, to_dict
from vlm_bridge.train.elementwise_recompute import apply_elementwise_recompute
from vlm_bridge.train.freeze import apply_freeze_and_peft
from vlm_bridge.train.loss import global_loss_totals, loss_forward_step
from vlm_bridge.train.low_memory_adam import adam_class, check_moments
from vlm_bridge.train.metrics import RunLogger
from vlm_bridge.train.recompute import apply_recompute, layers_kept_whole
from vlm_bridge.train.vision_ahead import vision_encoded_ahead


class NonFiniteLoss(ValueError):
    """Training produced a NaN/inf loss; stopping beats silently corrupting the weights. A
    ValueError: the settings or the data caused it, so the CLI says it as one ``error:`` line."""


@dataclass
class Run:
    cfg: TrainConfig
    built: object
    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    stream: object
    num_microbatches: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    rng_restored: bool | None = None  # resumed: whether the random streams continue (None: fresh)
    skipped_updates: int = 0  # fp16 steps whose gradients overflowed (no update)


def _optimizer(cfg: TrainConfig, model, dtype: torch.dtype):
    o = cfg.optim
    distributed = o.distributed_optimizer == "on" or (
        o.distributed_optimizer == "auto" and cuda_available()
    )
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=distributed, initial_loss_scale=initial_loss_scale(cfg),
    )
    overrides = {}
    # Per-component learning rates over the prefixes the family declares for each component.
    component_lr = {"language_model": o.language_lr, "vision": o.vision_lr, "projector": o.projector_lr}
    for component, prefixes in model.module.component_prefixes.items():
        lr = component_lr[component]
        if lr is not None:
            patterns = tuple(f"*{prefix}*" for prefix in prefixes)
            overrides[ParamKey(name=patterns)] = {"max_lr": lr, "min_lr": lr * o.min_lr / o.lr}
    check_moments(o.moments, o.adam_beta1, o.adam_beta2)
    with adam_class(o.moments):
        optimizer = get_megatron_optimizer(config, [model], config_overrides=overrides or None)
    if decoupled_grads.enabled():
        decoupled_grads.decouple_low_precision_grads(optimizer)
    return optimizer


def prepare_model(cfg: TrainConfig, built) -> None:
    """Recomputation, PEFT and freeze flags on a built model (before DDP sees its parameters)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if cfg.parallel.tp > 1 and any(isinstance(m, MoELayer) for m in built.model.modules()):
        # Megatron trains MoE layers at TP > 1 only with sequence parallelism, which the models here
        # do not use (converting, verifying and generating at TP > 1 are not affected).
        raise ValueError(f"parallel.tp={cfg.parallel.tp}: a model with MoE layers fine-tunes at "
                         "parallel.tp=1; spread its experts with parallel.ep instead")
    recomputed: list[str] = []
    if cfg.recompute or cfg.recompute_components or cfg.recompute_layers:
        recomputed = apply_recompute(built.model, tuple(dict.fromkeys(cfg.recompute_components)),
                                     cfg.recompute_layers)
    apply_freeze_and_peft(built.model, cfg.freeze, cfg.peft)
    if cfg.recompute_elementwise:  # after PEFT, whose adapters replace the linears it hooks
        apply_elementwise_recompute(layers_kept_whole(built.model, recomputed))


def build_scheduler(cfg: TrainConfig, optimizer) -> OptimizerParamScheduler:
    """Megatron's LR/WD scheduler for ``optim.schedule``: linear warmup from 0, then the decay."""
    # Megatron needs warmup < decay steps; a run shorter than its warmup warms up for all but
    # its last step.
    warmup = min(cfg.optim.warmup_steps, max(cfg.steps - 1, 0))
    wsd = cfg.optim.schedule == "wsd"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(cfg.steps, 1),
        lr_decay_style="WSD" if wsd else cfg.optim.schedule,
        wsd_decay_steps=(cfg.optim.decay_steps or max(cfg.steps // 10, 1)) if wsd else None,
        lr_wsd_decay_style="linear" if wsd else None,
        start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay,
        wd_incr_steps=max(cfg.steps, 1), wd_incr_style="constant",
        # On resume the run's own config sets the schedule (a run extended to more steps, or
        # given a new lr, follows it); the checkpoint gives only the position in it.
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )


def build_optimization(cfg: TrainConfig, built) -> tuple:
    """Megatron DDP around the model, the (distributed) optimizer and the LR/WD scheduler."""
    use_foreach_multi_tensor_ops()
    keep_unsaved_optimizer_keys()
    lang = built.model.language_model.config
    lang.calculate_per_token_loss = True
    distributed = cfg.optim.distributed_optimizer == "on" or (
        cfg.optim.distributed_optimizer == "auto" and cuda_available()
    )
    ddp = DistributedDataParallel(
        config=lang,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.optim.grad_reduce_in_fp32, use_distributed_optimizer=distributed
        ),
        module=built.model,
    )
    optimizer = _optimizer(cfg, ddp, DTYPES[cfg.dtype])
    scheduler = build_scheduler(cfg, optimizer)
    lang.finalize_model_grads_func = decoupled_grads.finalize_func(optimizer)
    lang.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, scheduler


def setup(cfg: TrainConfig) -> Run:
    """Model (from HF or Megatron), freeze/PEFT, DDP, optimizer, scheduler, data, resume."""
    from vlm_bridge.train.data_setup import build_stream

    check_config(cfg)
    # A symlinked run folder is written where it points (a dangling link: its target is created).
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    parallel = ParallelConfig(tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, cp=cfg.parallel.cp)
    parallel.validate()
    init_distributed(parallel, seed=cfg.seed)
    from vlm_bridge.inference.command import resolve_pretrained

    built = load_pretrained(resolve_pretrained(cfg.pretrained), parallel, DTYPES[cfg.dtype])
    prepare_model(cfg, built)
    if cfg.checkpoint.export_hf and cfg.peft.method:  # refused now, not after training
        from vlm_bridge.peft.hf_export import check_exportable

        check_exportable(built)
    ddp, optimizer, scheduler = build_optimization(cfg, built)
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of "
            f"micro_batch_size {cfg.micro_batch_size} x data-parallel size {dp}"
        )
    stream = build_stream(cfg, built)
    run = Run(cfg, built, ddp, optimizer, scheduler, stream,
              cfg.global_batch_size // (cfg.micro_batch_size * dp))
    _maybe_resume(run)
    return run


def _checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def _maybe_resume(run: Run) -> None:
    root = _checkpoint_root(run.cfg)
    step = ckpt.latest_step(root) if run.cfg.checkpoint.resume else None
    if step is None:
        return
    # The optimizer's state restores its param groups' peak and final rates too; this run's
    # config sets them (as it sets the scheduler's: see the override in build_optimization).
    rates = [(group.get("max_lr"), group.get("min_lr")) for group in run.optimizer.param_groups]
    extra = ckpt.load_checkpoint(ckpt.iteration_dir(root, step), run.model, run.optimizer,
                                 run.scheduler)
    for group, (max_lr, min_lr) in zip(run.optimizer.param_groups, rates, strict=True):
        if max_lr is not None:
            group["max_lr"], group["min_lr"] = max_lr, min_lr
    run.scheduler.step(increment=0)  # the rates at the restored step, from the restored groups
    run.step = extra["step"]
    run.rng_restored = extra["rng_restored"]
    if dist.get_rank() == 0:
        fresh = "" if run.rng_restored else (f"; it was saved at another layout ({extra.get('layout')}), "
                                             "so random streams such as dropout's start afresh")
        print(f"resuming from step {step} ({ckpt.iteration_dir(root, step)}){fresh}", flush=True)
    run.losses = list(extra.get("losses", []))
    run.stream.position.epoch, run.stream.position.index = extra["data_epoch"], extra["data_index"]


def forward_backward(run: Run, prepare_next: bool = False) -> tuple[list[dict], list]:
    """Forward and backward over the next global batch; gradients reduced, no update yet.
    ``prepare_next``: the step after it is built on the host meanwhile (see data_stream)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    step_batches = run.stream.next_step(run.num_microbatches * dp)
    if prepare_next:
        run.stream.prepare_next(run.num_microbatches * dp)
    while len(step_batches) % dp:  # a step split further (images apart from videos): every rank runs
        # as many forwards (experts exchange tokens in each); the extra one counts for nothing
        step_batches.append(dataclasses.replace(step_batches[-1], num_tokens=0,
                                                loss_mask=torch.zeros_like(step_batches[-1].loss_mask)))
    mine = [mb.to(device()) for mb in step_batches[dp_rank::dp]]
    # The schedule sizes pipeline messages from this (divided by CP, as the model pads).
    seq_len = padded_length(mine[0].labels.shape[1], run.cfg.parallel.cp)
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    # A frozen vision tower encodes the media of all these micro-batches at once.
    with vision_encoded_ahead(run.model, [mb.inputs for mb in mine]):
        outputs = get_forward_backward_func()(
            forward_step_func=loss_forward_step, data_iterator=iter(mine), model=[run.model],
            num_microbatches=len(mine), seq_length=seq_len, micro_batch_size=run.cfg.micro_batch_size,
            forward_only=False,
        )
    return outputs, step_batches


def train_step(run: Run, prepare_next: bool = False) -> dict:
    """One global step: forward/backward over all micro-batches, optimizer and LR update."""
    outputs, step_batches = forward_backward(run, prepare_next)
    loss = _global_loss(outputs)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at step {run.step + 1}; stopping (lower optim.lr or "
                            "check the data)")
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves on)
    ok, grad_norm, _ = run.optimizer.step()
    stats = {"loss": loss, "grad_norm": float(grad_norm or 0.0), "update_ok": bool(ok), "lr": lr,
             "tokens": sum(mb.num_tokens for mb in step_batches)}
    if ok:
        run.scheduler.step(increment=1)
    else:  # fp16 gradients overflowed: no update, a smaller loss scale, the schedule waits (Megatron's rule)
        run.skipped_updates += 1
        stats["loss_scale"] = float(run.optimizer.get_loss_scale())
    run.step += 1
    run.losses.append(loss)
    run.grad_norms.append(stats["grad_norm"])
    return stats


def _global_loss(outputs: list[dict]) -> float:
    """Token-mean loss over the global batch (last stage, summed over data parallel)."""
    total, tokens = global_loss_totals(outputs)
    return total / max(tokens, 1.0)


def save(run: Run) -> Path:
    position = run.stream.resume_position  # not a step built ahead
    extra = {"step": run.step, "data_epoch": position.epoch, "data_index": position.index,
             "losses": run.losses,
             "config": to_dict(run.cfg)}
    parallel = ParallelConfig(tp=run.cfg.parallel.tp, pp=run.cfg.parallel.pp, ep=run.cfg.parallel.ep)
    # The same metadata as an import (key and expert layouts), plus what export needs to rebuild
    # and merge the adapters.
    meta = conversion_meta(run.built, parallel, dtype=dtype_name(DTYPES[run.cfg.dtype]),
                           peft=dataclasses.asdict(run.cfg.peft) if run.cfg.peft.method else None)
    return ckpt.save_checkpoint(_checkpoint_root(run.cfg), run.step, run.model, run.optimizer,
                                run.scheduler, extra, meta, run.built.hf_side_dir)


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run on every rank. ``stop_after`` ends early after that many steps (tests interruption)."""
    saved = ckpt.latest_step(_checkpoint_root(cfg)) if cfg.checkpoint.resume else None
    if saved is not None and saved >= cfg.steps:
        # Nothing is left to train: no model is built for training, and the saved run (whose
        # settings may differ from these) and its output folder are left as they are, except for
        # an HF export asked for now that the last checkpoint lacks.
        exported = None
        if cfg.checkpoint.export_hf:
            from vlm_bridge.train.export import export_saved_checkpoint

            exported = export_saved_checkpoint(cfg, ckpt.iteration_dir(_checkpoint_root(cfg), saved))
        return {"steps": saved, "start_step": saved, "losses": [], "seconds": 0.0, "skipped": {},
                "output_dir": cfg.output_dir, "validation": [], "grad_norms": [], "lrs": [],
                "exported": str(exported) if exported else None}
    run = setup(cfg)
    validator = None
    if cfg.data.validation:
        from vlm_bridge.train.validation import Validator

        validator = Validator(cfg, run.built)
    # A run that fails before its first step leaves no output folder behind (a folder that
    # existed before, e.g. a run being resumed, is left as it was).
    created = dist.get_rank() == 0 and not Path(cfg.output_dir).exists()
    logger = RunLogger(cfg, is_main=dist.get_rank() == 0, start_step=run.step)
    try:
        return _train_loop(run, validator, logger, stop_after)
    except BaseException:
        if created and not run.losses:
            logger.close(None)
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
        raise
    finally:
        run.stream.close()  # the encoding workers


def _train_loop(run: Run, validator, logger: RunLogger, stop_after: int | None) -> dict:
    cfg = run.cfg
    run.model.train()
    start, start_step = time.time(), run.step
    validation, lrs = [], []
    while run.step < cfg.steps:
        if stop_after is not None and run.step >= stop_after:
            break
        raise_if_stopped()  # a stop signal whose exception something swallowed ends the run here
        t0 = time.time()
        # The next step is built while this one trains, unless it is not going to run.
        more = run.step + 1 < cfg.steps and (stop_after is None or run.step + 1 < stop_after)
        stats = train_step(run, prepare_next=more)
        lrs.append(stats["lr"])
        logger.log(run.step, stats, time.time() - t0)
        # Saved before validating: a validation that fails (a user's metric) keeps the weights.
        last = stop_after is None and run.step >= cfg.steps
        saved = last or bool(cfg.checkpoint.save_every and run.step % cfg.checkpoint.save_every == 0)
        if saved:
            _save_and_maybe_export(run)
        if validator is not None and validator.due(run.step):
            try:
                report = validator.run(run)
            except Exception:  # a user's metric, say: the steps trained so far are kept first
                if not saved:
                    path = _save_and_maybe_export(run)
                    if dist.get_rank() == 0:
                        print(f"validation failed at step {run.step}; the weights are saved in {path}",
                              flush=True)
                raise
            logger.log_eval(run.step, report)
            validation.append({"step": run.step, **{k: v for k, v in report.items() if k != "answers"}})
    logger.close(run.losses)
    return {"steps": run.step, "start_step": start_step, "rng_restored": run.rng_restored,
            "losses": run.losses, "seconds": time.time() - start,
            "skipped": run.stream.counts(), "output_dir": cfg.output_dir,
            "validation": validation, "grad_norms": run.grad_norms, "lrs": lrs,
            "skipped_updates": run.skipped_updates}


def _save_and_maybe_export(run: Run) -> Path:
    path = save(run)
    if run.cfg.checkpoint.export_hf:
        from vlm_bridge.train.export import export_run_checkpoint

        export_run_checkpoint(run, path)
    if run.cfg.checkpoint.keep_last and dist.get_rank() == 0:  # after the export that reads it
        ckpt.prune_checkpoints(_checkpoint_root(run.cfg), run.cfg.checkpoint.keep_last)
    return path
