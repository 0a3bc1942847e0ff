"""One SFT (and LoRA) step of a Qwen-VL, Gemma 3 or Nemotron VL model on 1..N GPUs: Megatron vs HF.

    python benchmarks/sft_step.py --size 7b --workdir /tmp/w [--steps 5] [--warmup 2] [--mode sft,lora]
    python benchmarks/sft_step.py --size qwen3_30b_a3b_8l --gpus 2 --ep 2 --workdir /tmp/m \
        --mode sft --systems hf,megatron,megatron_sequential      # MoE: EP=2 vs HF DDP on 2 GPUs
    python benchmarks/sft_step.py --size tiny --workdir /tmp/t --dtype fp32 --steps 1 --warmup 1  # CPU
    python benchmarks/sft_step.py --size gemma3_4b --workdir /tmp/g4b --mode sft,lora
    python benchmarks/sft_step.py --size gemma3_tiny --workdir /tmp/gt --dtype fp32 --steps 1 --warmup 1
    python benchmarks/sft_step.py --size nemotron_12b --workdir /tmp/n12 --mode lora
    python benchmarks/sft_step.py --size nemotron_tiny --workdir /tmp/nt --dtype fp32 --steps 1 --warmup 1

Both systems train on the same seeded samples (one image of 224-896 px a side, 100-700 text tokens
of random words), encoded once by ``SampleEncoder`` and packed once into rows of at most
``--seq-len`` tokens as the trainer packs them (best-fit decreasing; ``--packing in-order`` closes a
row at the first sample that overflows it and pads every row to ``--seq-len``, as before); with
``--gpus N`` the rows are cut to a multiple of N and rank r trains on rows r, r+N, ... (both systems:
the same tokens per GPU). Megatron: ``--micro-batch`` rows per micro-batch (default 1), each
micro-batch ending at the next multiple of ``--row-multiple`` after its longest row (the trainer's
``data.row_multiple``; 0: ``--seq-len``), one global step over all rows,
``trainer.train_step`` on a model set up as ``trainer.setup`` does (DDP, Adam with fp32 master
weights, distributed optimizer on CUDA, per-token loss), ``--ep`` experts per group for MoE (EP is
carved out of data parallelism, as Megatron does). ``megatron_sequential`` is the same with the
experts run one by one (Megatron's ``SequentialMLP``) instead of as grouped GEMMs. HF: right-padded
batches of ``--hf-batch`` of the rank's samples in their original order, gradient accumulation,
torch DDP over the GPUs, a per-token loss over the global step (``num_items_in_batch``), fused
AdamW on the bf16 parameters (bf16 states, no fp32 master: what HF Trainer does with a
bf16-loaded model), grad clipping 1.0 as Megatron, experts as transformers' default for the
model (grouped_mm for Qwen3-VL-MoE).
``first_loss_diff`` (loss before any update) checks both see the same data; it is 0 up to dtype
noise: Megatron pads the vocabulary to a multiple of 128 (tiny: 300 -> 384) but masks the padded
logit columns out of the loss. MFU = model FLOPs (``step_flops``: real tokens, active experts only)
/ (step time * GPUs * --peak-tflops).

Memory at 7B (8.29e9 params): Megatron SFT keeps bf16 weights 2 B + fp32 grad buffer 4 B
(grad_reduce_in_fp32) + fp32 master 4 B + Adam 8 B = 18 B/param = 149 GB before activations (the
distributed optimizer shards nothing at DP=1): it does NOT fit one H200 (141 GB). HF keeps 8 B/param
(66 GB). ``--num-layers K`` trims the LM to its first K layers for both systems (streamed copy of the
checkpoint; K=16: 99 GB of Megatron state). LoRA fits at full depth. An OOM is recorded and the
system retried once with recomputation (HF: gradient checkpointing); any other error is recorded
and the run goes on. Peak memory is the largest over the GPUs.

Gemma 3: every image is resized to 896x896 (256 soft tokens; ``--max-pixels`` does not apply) and
the HF batches carry the processor's ``token_type_ids``: without them transformers 5.24 silently
drops the bidirectional attention within each image (a causal mask only), unlike Megatron. 4B:
4.30e9 params, Megatron SFT 77 GB of state, HF 34 GB: both fit one H200. 12B (219 GB) and 27B
(494 GB) do not for SFT: use --num-layers or LoRA. LoRA trainable counts differ between the systems
by design (Megatron adapts the fused QKV and gate/up matrices).

Nemotron VL (``nemotron_12b``: 13.2e9 params, 12.3e9 of them the hybrid LM): images go through its
processor at their own patch grid, scaled into 1024..``--max-pixels`` / 256 patches (224-896 px ->
256-784 image tokens); the HF batches carry ``image_grid_hw`` in sample order. LoRA adapts the same
layers on both sides: the family's Megatron targets (``nemotron_vl.recipes.LORA_TARGETS``: fused
QKV, attention output, MLP fc1/fc2, Mamba ``in_proj``/``out_proj``) and HF's q/k/v/o, up/down and
Mamba ``in_proj``/``out_proj`` of every ``language_model.model.layers.N.mixer``. Neither side has
``mamba_ssm``: HF runs transformers' pure-torch chunked scan (``hf_mamba_kernels`` in the result
says whether the package was importable), Megatron the family's pure-torch mixer. SFT at 12B needs
~237 GB of Megatron state: LoRA (or --num-layers) on one H200.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = ("red green blue square circle image left right top bottom large small shape colour corner "
         "centre the a of is and with near above below inside outside shows picture background").split()
HF_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Nemotron-H: every layer's module is ``mixer`` (Mamba-2, attention or MLP); the RADIO tower has q/k/v/o too.
HF_LORA_TARGETS_NEMOTRON = (r".*language_model\.model\.layers\.\d+\.mixer\."
                            r"(in_proj|out_proj|q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)")


def lora_targets(model_type: str) -> tuple[str, tuple[str, ...] | None]:
    """(HF PEFT target regex, Megatron LoRA targets or None for the trainer's default) of a family."""
    if model_type == "nemotron_h_omni":
        from vlm_bridge.families.nemotron_vl.recipes import LORA_TARGETS

        return HF_LORA_TARGETS_NEMOTRON, LORA_TARGETS
    return HF_LORA_TARGETS, None


def make_samples(n: int, seed: int, tokenizer) -> list[dict]:
    """Chat-schema samples: one image (224-896 px a side), 100-700 text tokens (prompt + answer)."""
    from vlm_bridge.testing.media import make_image

    rng = random.Random(seed)
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in WORDS}

    def text(tokens: int) -> str:
        words, used = [], 0
        while used < tokens:
            words.append(rng.choice(WORDS))
            used += cost[words[-1]]
        return " ".join(words).capitalize() + "."

    samples = []
    for i in range(n):
        width, height = 28 * rng.randint(8, 32), 28 * rng.randint(8, 32)
        total = rng.randint(100, 700)
        prompt = rng.randint(total // 5, total // 2)
        user = [{"type": "image", "image": make_image(width, height, seed=seed * 1000 + i)},
                {"type": "text", "text": text(prompt)}]
        samples.append({"messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": text(total - prompt)}]})
    return samples


def trimmed_checkpoint(src: Path, layers: int) -> Path:
    """A copy of ``src`` with only the first ``layers`` LM layers (streamed, reused when present)."""
    from vlm_bridge.convert import hf_io

    dst = src.parent / f"{src.name}_{layers}layers"
    if (dst / "config.json").is_file():
        return dst
    cfg = json.loads((src / "config.json").read_text())
    text = cfg["text_config"]
    blocks = text.get("layers_block_type")  # Nemotron-H: the layer count is this list's length
    total = len(blocks) if blocks is not None else text["num_hidden_layers"]
    if not 0 < layers <= total:
        raise SystemExit(f"--num-layers must be in 1..{total}")
    if blocks is None or "num_hidden_layers" in text:
        text["num_hidden_layers"] = layers
    if "max_window_layers" in text:  # a Qwen field; Gemma 3 has none
        text["max_window_layers"] = min(text["max_window_layers"], layers)
    for kinds in ("layer_types", "layers_block_type", "hybrid_override_pattern"):
        if text.get(kinds) is not None:
            text[kinds] = text[kinds][:layers]
    # Qwen2.5-VL model.layers.N, Qwen3-VL model.language_model.layers.N, Gemma 3 and Nemotron
    # language_model.model.layers.N (Nemotron's v2 layout: language_model.backbone.layers.N)
    layer_key = re.compile(
        r"^(?:model\.(?:language_model\.)?|language_model\.(?:model|backbone)\.)layers\.(\d+)\.")
    with hf_io.atomic_output_dir(dst, overwrite=True) as tmp, hf_io.SafetensorsReader(src) as reader:
        writer = hf_io.ShardedSafetensorsWriter(tmp)
        for key in reader.keys():
            m = layer_key.match(key)
            if m is None or int(m.group(1)) < layers:
                writer.add(key, reader.get(key))
        writer.finalize()
        hf_io.copy_hf_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _timed(step, args) -> dict:
    """Warm-up steps, then ``--steps`` timed steps; peak memory over the timed steps, max over GPUs."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses = [step() for _ in range(args.warmup)]  # losses[0]: before any update, same for both
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync()  # the steps already wait for the loss on the host; this is cheap
        times.append(time.perf_counter() - t0)
    peak = None
    if cuda:
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 1e9, device="cuda")
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peak = float(peak)
    return {"step_s": sum(times) / len(times), "step_times": times, "losses": losses, "peak_gb": peak}


def run_hf(*args) -> dict:
    from vlm_bridge.parallel import run_parallel

    return run_parallel(_hf_rank, args[2].gpus, *args)


def _hf_batches(group: list, pad_id: int) -> dict:
    """Processor-style right padding; labels -100 on padding and non-assistant tokens.

    Whatever the family's processor returned travels as it would in a processor batch: every
    per-token output the encoder kept (``EncodedSample.tokens``: Qwen's ``mm_token_type_ids``,
    Gemma's ``token_type_ids``) padded with 0 (text), every media tensor (``EncodedSample.media``:
    ``pixel_values`` and Qwen's ``image_grid_thw``) concatenated in sample order.
    """
    import torch

    shape = (len(group), max(len(s) for s in group))
    token_keys = sorted({key for s in group for key in s.tokens})
    media_keys = sorted({key for s in group for key in s.media})
    b = {"input_ids": torch.full(shape, pad_id), "labels": torch.full(shape, -100),
         "attention_mask": torch.zeros(shape, dtype=torch.long),
         **{key: torch.zeros(shape, dtype=torch.long) for key in token_keys},
         **{key: torch.cat([s.media[key] for s in group if key in s.media]) for key in media_keys}}
    for r, s in enumerate(group):
        per_token = {"input_ids": s.input_ids, "attention_mask": 1, "labels": s.labels, **s.tokens}
        for key, value in per_token.items():
            b[key][r, :len(s)] = value
    return b


def _hf_rank(hf_dir: Path, encoded: list, args, rows: list, lora: bool, recompute: bool) -> dict:
    """HF model, one replica per GPU under torch DDP; this rank trains on its rows' samples."""
    import contextlib

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForImageTextToText

    from vlm_bridge.parallel import ParallelConfig, device, init_distributed

    init_distributed(ParallelConfig())
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = device()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = AutoModelForImageTextToText.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="sdpa", device_map={"": dev})
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model.config.model_type)[0]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=targets))
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=dev.type == "cuda")
    mine = [encoded[i] for i in sorted(i for row in rows[rank::world] for i in row)]
    batches = [_hf_batches(mine[i:i + args.hf_batch], args.pad_id)
               for i in range(0, len(mine), args.hf_batch)]
    loss_tokens = sum(encoded[i].num_loss_tokens for row in rows for i in row)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=dev)
        for n, b in enumerate(batches):
            # DDP averages gradients over ranks: x world keeps the per-token sum over the global step
            sync = n == len(batches) - 1 or world == 1
            with contextlib.nullcontext() if sync else trained.no_sync():
                out = trained(**{k: v.to(dev, non_blocking=True) for k, v in b.items()},
                              num_items_in_batch=loss_tokens)
                (out.loss * world).backward()
            total += out.loss.detach().float()
        if world > 1:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(total)

    res = _timed(step, args)
    counts = torch.tensor([sum(len(s) for s in mine), sum(b["input_ids"].numel() for b in batches),
                           len(batches)], device=dev)
    if world > 1:
        dist.all_reduce(counts)
    res.update(real_tokens=int(counts[0]), padded_tokens=int(counts[1]), microbatches=int(counts[2]),
               trainable_params=sum(p.numel() for p in params), recompute=recompute,
               experts_implementation=getattr(model.config, "_experts_implementation", None),
               optimizer=f"torch AdamW(fused={dev.type == 'cuda'}), {args.dtype} params + states, no master")
    if model.config.model_type == "nemotron_h_omni":  # False: transformers' pure-torch Mamba scan
        import importlib.util

        res["hf_mamba_kernels"] = importlib.util.find_spec("mamba_ssm") is not None
    return res


def run_megatron(*args) -> dict:
    from vlm_bridge.parallel import run_parallel

    return run_parallel(_megatron_rank, args[2].gpus, *args)


def run_megatron_sequential(*args) -> dict:
    """Megatron with SequentialMLP experts (spawned ranks inherit the switch)."""
    from vlm_bridge.families._common.experts import EXPERTS_ENV

    os.environ[EXPERTS_ENV] = "sequential"
    try:
        return run_megatron(*args)
    finally:
        os.environ.pop(EXPERTS_ENV)


def _megatron_rank(hf_dir: Path, encoded: list, args, rows: list, lora: bool, recompute: bool) -> dict:
    """trainer.setup without the data stream, then trainer.train_step on fixed packed rows."""

    from vlm_bridge.compat.cpu import cuda_available
    from vlm_bridge.convert.engine import DTYPES
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.train import trainer
    from vlm_bridge.train.batching import collate_packed, row_length
    from vlm_bridge.train.config import ParallelSettings, PeftSettings, TrainConfig

    parallel = ParallelConfig(ep=args.ep)
    per_mb = args.micro_batch
    cfg = TrainConfig(dtype=args.dtype, steps=args.warmup + args.steps, micro_batch_size=per_mb,
                      recompute=recompute, parallel=ParallelSettings(ep=args.ep))
    cfg.optim.warmup_steps = 0
    cfg.optim.grad_reduce_in_fp32 = not getattr(args, "bf16_grads", False)
    cfg.optim.moments = "bf16" if getattr(args, "bf16_moments", False) else "fp32"
    cfg.recompute_components = tuple(c for c in getattr(args, "recompute_components", "").split(",") if c)
    cfg.recompute_layers = getattr(args, "recompute_layers", 0)
    cfg.recompute_elementwise = getattr(args, "recompute_elementwise", False)
    if lora:  # routed experts are never adapted, like HF's targets (its experts are 3-D tensors)
        cfg.peft = PeftSettings(method="lora", rank=16, alpha=32.0)
        targets = lora_targets(args.model_type)[1]  # the family's (Nemotron: Mamba in/out too)
        if targets is not None:
            cfg.peft.targets = targets
    init_distributed(parallel, seed=cfg.seed)
    built = load_hf(str(hf_dir), parallel, DTYPES[cfg.dtype])
    trainer.prepare_model(cfg, built)  # the trainer's own set-up, minus the data stream
    ddp, optimizer, scheduler = trainer.build_optimization(cfg, built)
    groups = [[[encoded[i] for i in row] for row in rows[j:j + per_mb]] for j in range(0, len(rows), per_mb)]
    mbs = [collate_packed(g, built.family, built.settings, row_length(g, args.seq_len, args.row_multiple),
                          args.pad_id) for g in groups]
    cfg.global_batch_size = len(rows)
    stream = SimpleNamespace(next_step=lambda n: mbs)  # the same packed rows every step
    run = trainer.Run(cfg, built, ddp, optimizer, scheduler, stream, len(mbs) // args.gpus)
    ddp.train()
    res = _timed(lambda: trainer.train_step(run)["loss"], args)
    if getattr(args, "profile", False):
        res["profile"] = _profile(lambda: trainer.train_step(run), getattr(args, "profile_top", 15))
    if getattr(args, "sync_report", False):
        res["host_syncs"] = _host_syncs(lambda: trainer.train_step(run))
    res.update(real_tokens=sum(mb.num_tokens for mb in mbs),
               padded_tokens=sum(mb.labels.numel() for mb in mbs),
               microbatches=len(mbs), recompute=recompute, parallel=str(parallel),
               recompute_components=list(cfg.recompute_components), recompute_layers=cfg.recompute_layers,
               recompute_elementwise=cfg.recompute_elementwise,
               experts=os.environ.get("VLM_BRIDGE_MOE_EXPERTS", "grouped"),
               trainable_params=sum(p.numel() for p in built.model.parameters() if p.requires_grad),
               optimizer=f"Megatron Adam, fp32 master, {cfg.optim.moments} moments, "
                         f"{'fp32' if cfg.optim.grad_reduce_in_fp32 else 'bf16'} grads, "
                         f"distributed={cuda_available()}")
    return res


def _host_syncs(step, top: int = 20) -> list:
    """One extra step: every operation that made the host wait for the GPU, by calling frames."""
    from vlm_bridge.testing.host_waits import host_waits

    return [[count, frames] for frames, count in host_waits(step).most_common(top)]


def _profile(step, top: int = 15) -> dict:
    """One extra step under torch.profiler: where device time goes, by kernel and by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    # Idle time from a step profiled without stacks and shapes: recording those costs the host so
    # much that the GPU waits for it (a 1.08 s step took 1.86 s, 0.94 s of it idle, on one H100).
    with profile(activities=acts) as light:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    # Kernels only: CPU-side ops (aten::mm) would count their kernels twice, and
    # "Command Buffer Full" is the host waiting on a full launch queue (the GPU is the bottleneck).
    events = [e for e in prof.key_averages()
              if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0
              and "Command Buffer Full" not in e.key]
    total = sum(e.self_device_time_total for e in events) or 1.0
    kinds = {"gemm": ("gemm", "cutlass", "sm90", "nvjet", "cublas"), "attention": ("flash", "fmha",
             "attention"), "nccl/copy": ("nccl", "memcpy", "copy"), "norm/elementwise": ("norm",
             "elementwise", "vectorized", "reduce", "softmax", "cross_entropy")}
    share = dict.fromkeys(kinds, 0.0)
    for e in events:
        name = e.key.lower()
        kind = next((k for k, keys in kinds.items() if any(x in name for x in keys)), None)
        if kind:
            share[kind] += e.self_device_time_total / total
    ranked = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"device_ms": total / 1e3, "share": share, "by_op": _device_time_by_op(prof, top),
            "top": [(e.key[:90], round(e.self_device_time_total / 1e3, 2)) for e in ranked],
            "host_top": [(e.key[:90], round(e.self_cpu_time_total / 1e3, 2), e.count) for e in host],
            "idle": _idle_or_error(light, top)}


def _idle_or_error(prof, top: int) -> dict:
    try:
        return _idle_gaps(prof, top)
    except Exception as exc:  # noqa: BLE001 - the rest of the profile still stands
        return {"error": f"{type(exc).__name__}: {exc}"}


def _idle_gaps(prof, top: int, min_gap_us: float = 20.0) -> dict:
    """When the GPU ran nothing during the step, and which op's launch ended each wait.

    Kernels are merged into busy intervals; each gap of at least ``min_gap_us`` is charged to the op
    that launched the kernel ending it: the host work the GPU waited for. ``head``/``tail``: from the
    step's first host op to its first kernel, and from its last kernel to its last host op. Read from
    the Kineto events, whose correlation ids every torch version keeps."""
    from torch.autograd import DeviceType

    events = list(prof.profiler.kineto_results.events())
    kernels = sorted((e for e in events if e.device_type() == DeviceType.CUDA), key=lambda e: e.start_ns())
    host = [e for e in events if e.device_type() == DeviceType.CPU]
    if not kernels or not host:
        return {}
    frontend = [e for e in host if e.linked_correlation_id() == 0]
    by_id = {e.correlation_id(): e for e in frontend}
    launches = {e.linked_correlation_id(): e for e in host if e.linked_correlation_id() > 0}

    def launcher(kernel) -> str:
        """The op that launched ``kernel``; for a launch outside any op (a Triton kernel called
        from Python), the innermost op around the launch call."""
        if kernel.linked_correlation_id() in by_id:
            return by_id[kernel.linked_correlation_id()].name()
        call = launches.get(kernel.linked_correlation_id())
        if call is None:
            return "?"
        t, thread = call.start_ns(), call.start_thread_id()
        around = [e for e in frontend if e.start_thread_id() == thread and e.start_ns() <= t <= e.end_ns()]
        inner = min(around, key=lambda e: e.end_ns() - e.start_ns(), default=None)
        return f"{inner.name() if inner is not None else '?'} > {kernel.name()[:40]}"

    charged: dict[str, list] = {}
    busy_end, idle, gaps = kernels[0].end_ns(), 0, 0
    for k in kernels[1:]:
        gap = k.start_ns() - busy_end
        if gap >= min_gap_us * 1e3:
            entry = charged.setdefault(launcher(k), [0.0, 0])
            entry[0] += gap / 1e6
            entry[1] += 1
            idle += gap
            gaps += 1
        busy_end = max(busy_end, k.end_ns())
    ranked = sorted(charged.items(), key=lambda kv: -kv[1][0])[:top]
    return {"idle_ms": round(idle / 1e6, 2), "gaps": gaps,
            "head_ms": round((kernels[0].start_ns() - min(e.start_ns() for e in host)) / 1e6, 2),
            "tail_ms": round(max(0, max(e.end_ns() for e in host) - busy_end) / 1e6, 2),
            "span_ms": round((busy_end - kernels[0].start_ns()) / 1e6, 2),
            "by_launcher": [(name, round(ms, 2), n) for name, (ms, n) in ranked]}


def _device_time_by_op(prof, top: int) -> list:
    """The ops whose kernels took the most device time, by (op, input shapes, nearest project or
    Megatron frame): which matmul a slow GEMM kernel belongs to."""
    totals: dict[tuple, list] = {}
    for event in prof.events():
        kernels = getattr(event, "kernels", None) or []
        if not kernels:
            continue
        frames = [f for f in (event.stack or []) if "vlm_bridge" in f or "megatron" in f]
        key = (event.name, str(event.input_shapes)[:160], (frames[0] if frames else "")[-120:])
        entry = totals.setdefault(key, [0.0, 0])
        entry[0] += sum(k.duration for k in kernels) / 1e3
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [(*key, round(ms, 2), count) for key, (ms, count) in ranked]


def guarded(fn, *fn_args) -> dict:
    """Run one system; on OOM retry once with recomputation; record any error and carry on."""
    import torch

    errors, cuda = [], torch.cuda.is_available()
    args = fn_args[2]
    for recompute in (True,) if getattr(args, "recompute", False) else (False, True):
        res, oom = None, False
        try:
            res = fn(*fn_args, recompute)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
            errors.append(f"{'recompute: ' if recompute else ''}{type(exc).__name__}: {exc}"[:1500])
            print(traceback.format_exc(limit=-4), file=sys.stderr)
        gc.collect()  # the exception (and its frames holding the model) is gone by now
        if cuda:
            torch.cuda.empty_cache()
        left = {"allocated_after_free_gb": torch.cuda.memory_allocated() / 1e9 if cuda else None}
        if res is not None:
            return {**res, "errors": errors, **left}
        if not oom:
            break
    return {"error": errors[-1], "errors": errors, **left}


def _metrics(res: dict, flops: float, args, cuda: bool) -> None:
    if "step_s" in res:
        res["tokens_per_s"] = res["real_tokens"] / res["step_s"]
        res["padding_fraction"] = 1 - res["real_tokens"] / res["padded_tokens"]
        res["mfu"] = flops / (res["step_s"] * args.gpus * args.peak_tflops * 1e12) if cuda else None


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


SYSTEMS = ("hf", "megatron", "megatron_sequential")


def print_table(result: dict) -> None:
    print(f"\n{'mode':<6}{'system':<21}{'step s':>9}{'tokens/s':>11}{'MFU %':>8}{'peak GB':>9}{'pad %':>7}")
    for mode, out in result["modes"].items():
        for name, r in ((n, out[n]) for n in SYSTEMS if n in out):
            if "error" in r:
                print(f"{mode:<6}{name:<21}failed: {r['error'][:100]}")
                continue
            print(f"{mode:<6}{name:<21}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
                  f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f'):>8}{_fmt(r['peak_gb'], '.1f'):>9}"
                  f"{100 * r['padding_fraction']:>7.1f}  {'recompute' if r['recompute'] else ''}")
        for name, ratio in out.get("over_hf", {}).items():
            print(f"{mode:<6}{name + '/hf':<21}{'':>9}{_fmt(ratio['tokens_per_s'], '.2f', 'x'):>11}{'':>8}"
                  f"{_fmt(ratio['peak_gb'], '.2f', 'x'):>9}  first loss diff {ratio['first_loss_diff']:.4f}")


def _state_gb(flops: dict, args, lora: bool) -> dict:
    """Weights + gradients + optimizer state per GPU, before activations (bytes/param in the module
    doc; Megatron's experts are split over --ep GPUs, its distributed optimizer sharding ignored)."""
    params = flops["params"]
    n, experts = params["all"], params["experts"]
    trained = 0 if lora else n
    wbytes = 2 if args.dtype == "bf16" else 4
    per_gpu = n - experts + experts / args.ep
    # grad 4 (2 with --bf16-grads) + master 4 (bf16 only) + moments 8 (4 with --bf16-moments)
    trained_bytes = (2 if getattr(args, "bf16_grads", False) else 4) + (4 if wbytes == 2 else 0) + \
        (4 if getattr(args, "bf16_moments", False) else 8)
    megatron = (wbytes * per_gpu + trained_bytes * (0 if lora else per_gpu)) / 1e9
    hf = (wbytes * n + 3 * wbytes * trained) / 1e9
    return {"megatron": megatron, "megatron_sequential": megatron, "hf": hf}


def _in_order(lengths: list[int], seq_len: int) -> list[list[int]]:
    """The earlier packing: rows filled in sample order, each closed at the first overflow."""
    rows: list[list[int]] = []
    used = seq_len + 1
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _packed_rows(encoded: list, args) -> list[list[int]]:
    """Samples packed into --seq-len rows, cut to a multiple of --gpus (equal rows per GPU)."""
    from vlm_bridge.train.batching import pack_best_fit

    pack = pack_best_fit if args.packing == "best-fit" else _in_order
    rows = pack([len(s) for s in encoded], args.seq_len)
    rows = rows[: len(rows) - len(rows) % args.gpus]
    if not rows:
        raise SystemExit(f"{len(encoded)} samples pack into fewer rows than --gpus {args.gpus}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b", help="7b, tiny, qwen3_8b, qwen3_30b_a3b[_<N>l], gemma3_4b, "
                   "gemma3_12b, gemma3_27b, gemma3_tiny, nemotron_12b, nemotron_tiny (make_checkpoint)")
    p.add_argument("--hf", default=None, help="use this HF folder instead of WORKDIR/hf")
    p.add_argument("--workdir", required=True, help="checkpoint in WORKDIR/hf (written if missing)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", default="sft,lora", help="comma list of sft, lora")
    p.add_argument("--systems", default="hf,megatron", help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--gpus", type=int, default=1, help="ranks (one per GPU); HF runs DDP over them")
    p.add_argument("--ep", type=int, default=1, help="Megatron expert parallelism (MoE; divides --gpus)")
    p.add_argument("--samples", type=int, default=None,
                   help="default 24 / 8 (tiny, gemma3_tiny, nemotron_tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=4096, help="max sample length and packed row length")
    p.add_argument("--hf-batch", type=int, default=4)
    p.add_argument("--packing", choices=["best-fit", "in-order"], default="best-fit",
                   help="in-order: the earlier packing (also pads rows to --seq-len)")
    p.add_argument("--row-multiple", type=int, default=256,
                   help="Megatron micro-batches end at the next multiple after their longest row "
                        "(0: --seq-len)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="Megatron: packed rows per micro-batch (fewer, larger kernels per step)")
    p.add_argument("--max-pixels", type=int, default=896 * 896,
                   help="Qwen processor pixel cap (the checkpoint's is 448*448; 896*896 keeps every image "
                        "whole); Nemotron: at most this / 16^2 patches per image (at least 1024); "
                        "Gemma 3 always uses 896x896")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first K LM layers (both)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200)")
    p.add_argument("--force", action="store_true", help="run even when the state estimate exceeds the GPU")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--profile", action="store_true", help="profile one extra Megatron step")
    p.add_argument("--profile-top", type=int, default=15,
                   help="how many ops, kernels and idle launchers it lists")
    p.add_argument("--sync-report", action="store_true",
                   help="one extra Megatron step under CUDA sync debug mode: where the host waits")
    p.add_argument("--recompute", action="store_true", help="both systems recompute from the start")
    p.add_argument("--recompute-components", default="",
                   help="Megatron: recompute only these components' layers from the start (e.g. vision)")
    p.add_argument("--recompute-elementwise", action="store_true",
                   help="Megatron: keep no norm outputs or MLP activations; the backward rebuilds them")
    p.add_argument("--recompute-layers", type=int, default=0,
                   help="Megatron: recompute only the first N layers of each (0: all)")
    p.add_argument("--bf16-grads", action="store_true", help="Megatron: bf16 gradient buffers")
    p.add_argument("--bf16-moments", action="store_true", help="Megatron: Adam moments in bf16 (fp32 master)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("CI", "1")

    import torch
    from make_checkpoint import build_config, is_gemma3, is_nemotron, make_checkpoint
    from step_flops import model_flops
    from transformers import AutoConfig, AutoProcessor

    from vlm_bridge.data.encode import SampleEncoder

    cuda = torch.cuda.is_available()
    device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else None
    bad = set(args.mode.split(",")) - {"sft", "lora"} or set(args.systems.split(",")) - set(SYSTEMS)
    if bad or args.steps < 1 or args.gpus < 1 or args.gpus % args.ep:
        raise SystemExit(f"unknown --mode/--systems {sorted(bad)}" if bad else
                         "--steps and --gpus must be >= 1 and --ep must divide --gpus")
    if args.packing == "in-order":
        args.row_multiple = 0  # the earlier packing padded every row to --seq-len
    if args.row_multiple < 0:
        raise SystemExit("--row-multiple must be >= 0")
    if args.micro_batch < 1 or (args.micro_batch > 1 and args.gpus > 1):
        raise SystemExit("--micro-batch must be >= 1, and above 1 only with --gpus 1")
    if cuda and args.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices")
    hf_dir = Path(args.hf) if args.hf else Path(args.workdir) / "hf"
    if not args.hf:
        if not (hf_dir / "config.json").is_file():
            make_checkpoint(hf_dir, args.size, "bf16", overwrite=True)
        saved = json.loads((hf_dir / "config.json").read_text())
        want = build_config(args.size, False)
        # The model type too: tiny Qwen and tiny Gemma share hidden size 64.
        if (saved.get("model_type"), saved["text_config"]["hidden_size"]) != (
                want.model_type, want.text_config.hidden_size):
            raise SystemExit(f"{hf_dir} holds a {saved.get('model_type')} of hidden size "
                             f"{saved['text_config']['hidden_size']}, not a {args.size} checkpoint")
    if args.num_layers is not None:
        hf_dir = trimmed_checkpoint(hf_dir, args.num_layers)
    hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(hf_dir, local_files_only=True)
    args.model_type = hf_config.model_type
    if is_nemotron(hf_config):  # a patch budget per image, not a pixel range
        ip = processor.image_processor
        ip.max_num_patches = max(ip.min_num_patches, args.max_pixels // ip.patch_size**2)
    elif not is_gemma3(hf_config):  # Gemma's image processor resizes to a fixed square instead
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": args.max_pixels}
    tok = processor.tokenizer
    args.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoder = SampleEncoder(processor, max_seq_len=args.seq_len)
    tiny_sizes = ("tiny", "gemma3_tiny", "nemotron_tiny")
    raw = make_samples(args.samples or (8 if args.size in tiny_sizes else 24), args.seed, tok)
    all_encoded = [e for e in (encoder.encode(s) for s in raw) if e is not None]
    rows = _packed_rows(all_encoded, args)
    used = sorted(i for row in rows for i in row)  # FLOPs and statistics over the trained samples
    encoded = [all_encoded[i] for i in used]
    # From the config: Gemma's processor.image_token_id is <start_of_image>, one per image, while the
    # model's image_token_id is the soft token that the features replace (256 per image).
    image_id = hf_config.image_token_id
    result = {"size": args.size, "dtype": args.dtype, "hf_dir": str(hf_dir), "gpus": args.gpus, "ep": args.ep,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "peak_tflops": args.peak_tflops,
              "steps": args.steps, "warmup": args.warmup, "samples": len(encoded),
              "samples_left_out": len(all_encoded) - len(encoded), "encoder": encoder.stats,
              "packed_rows": len(rows), "sample_tokens": [len(s) for s in encoded],
              "image_tokens": sum(int((s.input_ids == image_id).sum()) for s in encoded),
              "loss_tokens": sum(s.num_loss_tokens for s in encoded), "modes": {}}
    systems = {"hf": run_hf, "megatron": run_megatron, "megatron_sequential": run_megatron_sequential}
    for mode in args.mode.split(","):
        lora = mode == "lora"
        flops = model_flops(hf_dir, encoded, lora)
        state = _state_gb(flops, args, lora)
        out = result["modes"][mode] = {"flops": flops, "weights_and_optimizer_gb_per_gpu": state}
        for name in args.systems.split(","):
            print(f"== {mode} {name}", file=sys.stderr, flush=True)
            if cuda and state[name] > 0.9 * device_gb and not args.force:  # activations need room too
                out[name] = {"error": f"skipped: weights + optimizer state alone need {state[name]:.0f} GB "
                             f"of {device_gb:.0f} GB on the device; trim with --num-layers (or --force)"}
                continue
            out[name] = guarded(systems[name], hf_dir, all_encoded, args, rows, lora)
            _metrics(out[name], flops["total"], args, cuda)
            if args.out:  # what is measured so far survives a run cut short
                Path(args.out).write_text(json.dumps(result, default=str) + "\n")
        hf = out.get("hf", {})
        for name in SYSTEMS[1:]:
            meg = out.get(name, {})
            if "step_s" in hf and "step_s" in meg:
                out.setdefault("over_hf", {})[name] = {
                    "tokens_per_s": meg["tokens_per_s"] / hf["tokens_per_s"],
                    "peak_gb": meg["peak_gb"] / hf["peak_gb"] if cuda else None,
                    "first_loss_diff": meg["losses"][0] - hf["losses"][0]}
    print_table(result)
    line = json.dumps(result, default=str)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
