"""HF export of a run's live model next to a checkpoint save (adapters merged for the export)."""

from __future__ import annotations

from pathlib import Path

from vlm_bridge.convert.engine import DTYPES
from vlm_bridge.loading import write_built


def export_run_checkpoint(run, checkpoint_path: Path) -> Path:
    """Write ``<checkpoint>/hf_export``: full weights, with LoRA/DoRA merged in temporarily, and
    the adapter alone in HF-PEFT format under ``<checkpoint>/hf_peft_adapter`` for PEFT runs."""
    out = Path(checkpoint_path) / "hf_export"
    model = run.built.model
    peft = run.cfg.peft.method is not None
    if peft:
        from vlm_bridge.peft.hf_export import export_hf_peft
        from vlm_bridge.peft.lora import merge_lora, unmerge_lora

        export_hf_peft(run.built, Path(checkpoint_path) / "hf_peft_adapter", run.cfg.pretrained)
        merge_lora(model)
    try:
        write_built(run.built, out, DTYPES[run.cfg.dtype], overwrite=True)
    finally:
        if peft:
            unmerge_lora(model)
    return out
