"""Training checkpoints through Megatron-Core distributed checkpointing (resumable at any TP/PP).

Expert parallelism is the exception: at EP > 1 Megatron splits the optimizer into a dense part and
an expert part (``chained_0.`` / ``chained_1.`` state keys), so optimizer state saved at EP=1 does not
resume at EP=2 or back; that is refused with a one-line error naming both ways forward (resume at
the saved EP, or start a new run from the checkpoint's weights, which load at any layout).

``<dir>/iter_0000100/`` is a complete vlm-bridge Megatron checkpoint (``weights/`` holds model,
optimizer, scheduler, RNG and data position; ``hf/`` and ``vlm_bridge.json`` make it exportable
with ``vlm-bridge export``). It is written under a temporary name and renamed when complete; only
then is ``<dir>/latest`` (the iteration number) replaced, atomically. An interrupted save is
therefore never the latest.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from vlm_bridge.compat.distopt_state import zero_state_to_load_into
from vlm_bridge.convert.engine import META_FILE
from vlm_bridge.convert.hf_io import CheckpointError, copy_hf_side_files
from vlm_bridge.convert.streaming import checkpoint_read_errors, without_record_crc
from vlm_bridge.parallel import cpu_group

LATEST = "latest"
# The distributed optimizer's state is saved in its canonical per-parameter form, so it reshards to
# any TP/PP/DP (Megatron 0.16 can no longer save the per-shard "fully_sharded_model_space" form:
# its flattened ranges are refused by the checkpoint validation).
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint: the ``latest`` pointer when it names a complete
    folder, else the highest ``iter_*`` folder (temporary ``.iter_*.tmp`` folders never count)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        text = pointer.read_text().strip()
        if text.isdigit() and (iteration_dir(root, int(text)) / "weights").is_dir():
            return int(text)
    steps = [int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit()]
    return max(steps) if steps else None


def _saved_at(folder: Path) -> float:
    done = folder / "weights" / ".metadata"  # the checkpoint's last file
    return (done if done.exists() else folder).stat().st_mtime


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` most recently saved checkpoints (with their HF exports), never
    the one ``latest`` names; returns what went. Recency is the save's time, not its step: a run
    started afresh in a folder that holds an earlier run's later steps keeps its own. Each goes by
    a rename to a temporary name first, so an interrupted removal never leaves a half-deleted
    folder that looks complete."""
    root = Path(root)
    steps = [int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit()]
    steps.sort(key=lambda step: (_saved_at(iteration_dir(root, step)), step))
    current = latest_step(root)
    removed = []
    for step in steps[:-keep] if keep > 0 else []:
        if step == current:
            continue
        folder = iteration_dir(root, step)
        doomed = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(folder)
    return removed


def _rng_object(world_layout: str) -> ShardedObject:
    """Per-rank RNG states, Megatron's tracker included (the dropout of a row-parallel adapter draws
    from its model-parallel stream); only restored when the rank layout is unchanged."""
    tracked = get_cuda_rng_tracker().get_states()
    state = {"torch": torch.get_rng_state(), "layout": world_layout,
             "tracker": {name: s.get_state() if isinstance(s, torch.Generator) else s.clone()
                         for name, s in tracked.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _restore_rng(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    tracker = get_cuda_rng_tracker()
    states = dict(tracker.get_states())
    for name, value in saved.get("tracker", {}).items():  # checkpoints before it kept none
        if isinstance(states.get(name), torch.Generator):
            states[name].set_state(value)
        else:
            states[name] = value
    tracker.set_states(states)


def _layout(legacy: bool = False) -> str:
    """The rank layout a checkpoint's per-rank RNG states belong to. Data, context and expert
    parallelism are named too: at one world size, DP=2 and CP=2 give rank 1 different roles."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if legacy:  # what checkpoints written before CP and EP were named recorded
        return f"tp{tp}pp{pp}w{dist.get_world_size()}"
    cp = parallel_state.get_context_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    return f"tp{tp}pp{pp}cp{cp}ep{ep}w{dist.get_world_size()}"


def _same_layout(saved: str | None) -> bool:
    if saved is None:
        return False
    return saved == (_layout() if "cp" in saved else _layout(legacy=True))


def _optimizer_layout(optimizer) -> dict:
    return {"expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
            "optimizer_parts": len(getattr(optimizer, "chained_optimizers", [optimizer]))}


def _check_optimizer_layout(path: str | Path, saved: dict, optimizer) -> None:
    now = _optimizer_layout(optimizer)
    if "optimizer_parts" in saved and saved["optimizer_parts"] != now["optimizer_parts"]:
        ep = saved["expert_parallel"]
        raise CheckpointError(
            f"{path}: optimizer state saved at expert parallelism {ep} ({saved['optimizer_parts']} "
            f"optimizer parts) cannot resume at parallel.ep={now['expert_parallel']} "
            f"({now['optimizer_parts']}); resume with parallel.ep={ep}, or start a new run from its "
            f"weights with pretrained={path}")


def _sharded(model, optimizer, loading: bool, with_rng: bool) -> dict:
    # The unwrapped module: DDP would prefix keys with "module.", and the model keys must stay
    # those an import writes so that `vlm-bridge export` reads training checkpoints too.
    model_sd = getattr(model, "module", model).sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                  metadata=OPTIM_METADATA),
    }
    if with_rng:
        state["rng"] = _rng_object(_layout())
    return state


@contextmanager
def _write_results_in_process() -> Iterator[None]:
    """Megatron's checkpoint writer returns its write results through a queue of a spawned
    ``Manager`` process, made for saves finished by another process. These saves run in this one,
    so a plain queue does: no server process (about 0.5 GB, seconds to start at the first save)
    that a killed run would leave behind."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._get_write_results_queue
    results: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results
    try:
        yield
    finally:
        filesystem_async._get_write_results_queue = original


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, extra: dict,
                    meta: dict, hf_side_dir: str | Path) -> Path:
    """Save on every rank; returns the final iteration directory."""
    final = iteration_dir(root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
        copy_hf_side_files(hf_side_dir, tmp / "hf")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    dist.barrier(group=cpu_group())
    try:
        state = _sharded(model, optimizer, loading=False, with_rng=True)
        # Plain (non-sharded) entries are "common" state, written once by rank 0.
        state["scheduler"] = scheduler.state_dict()
        state["extra"] = {**extra, "layout": _layout(), **_optimizer_layout(optimizer)}
        with without_record_crc(), _write_results_in_process():
            dist_checkpointing.save(state, str(tmp / "weights"))
    except BaseException:  # interrupted or failed: the unfinished save is not left behind
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier(group=cpu_group())
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = Path(root) / f".{LATEST}.tmp"
        latest_tmp.write_text(f"{step}\n")
        os.replace(latest_tmp, Path(root) / LATEST)
    dist.barrier(group=cpu_group())
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler (and RNG when the layout is the same); returns extra."""
    weights = str(Path(path) / "weights")
    with checkpoint_read_errors(path):
        common = dist_checkpointing.load_common_state_dict(weights)
        _check_optimizer_layout(path, common["extra"], optimizer)
        same_layout = _same_layout(common["extra"].get("layout"))
        zero_state_to_load_into(optimizer)
        state = dist_checkpointing.load(_sharded(model, optimizer, True, same_layout), weights)
    getattr(model, "module", model).load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _restore_rng(state["rng"])
    return {**common["extra"], "rng_restored": same_layout}
