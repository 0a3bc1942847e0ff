"""HF export of a run's live model next to a checkpoint save (adapters merged for the export)."""

from __future__ import annotations

from pathlib import Path

from vlm_bridge.convert.engine import DTYPES
from vlm_bridge.loading import write_built


def export_run_checkpoint(run, checkpoint_path: Path) -> Path:
    """Write ``<checkpoint>/hf_export``: full weights, with LoRA/DoRA merged in temporarily, and
    the adapter alone in HF-PEFT format under ``<checkpoint>/hf_peft_adapter`` for PEFT runs."""
    return _export(run.built, Path(checkpoint_path), DTYPES[run.cfg.dtype], run.cfg.peft.method is not None,
                   run.cfg.pretrained)


def export_saved_checkpoint(cfg, checkpoint_path: Path) -> Path | None:
    """Run on every rank: the export of ``export_run_checkpoint`` for a checkpoint already saved
    without one, or with only part of one (a finished run re-run with
    ``checkpoint.export_hf=true``); None when it has it all."""
    from vlm_bridge.convert.engine import read_meta
    from vlm_bridge.loading import load_megatron
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    checkpoint_path = Path(checkpoint_path)
    peft = bool(read_meta(str(checkpoint_path)).get("peft"))
    complete = (checkpoint_path / "hf_export" / "config.json").is_file() and (
        not peft or (checkpoint_path / "hf_peft_adapter" / "adapter_config.json").is_file())
    if complete:
        return None
    parallel = ParallelConfig(tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep)
    init_distributed(parallel, seed=cfg.seed)
    built, meta = load_megatron(str(checkpoint_path), parallel, merge=False)
    return _export(built, checkpoint_path, DTYPES[meta["dtype"]], peft, cfg.pretrained)


def _export(built, checkpoint_path: Path, dtype, peft: bool, base_model: str) -> Path:
    out = checkpoint_path / "hf_export"
    if peft:
        from vlm_bridge.peft.hf_export import export_hf_peft
        from vlm_bridge.peft.lora import merge_lora, unmerge_lora

        export_hf_peft(built, checkpoint_path / "hf_peft_adapter", base_model)
        merge_lora(built.model)
    try:
        write_built(built, out, dtype, overwrite=True)
    finally:
        if peft:
            unmerge_lora(built.model)
    return out
