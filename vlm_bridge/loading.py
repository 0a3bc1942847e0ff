"""Build a family's Megatron model on this rank and fill it: from an HF folder, or from a Megatron
checkpoint saved at any layout; and the ``import`` / ``export`` commands on top of the engine.

This is where the registry, the conversion engine and PEFT meet: ``convert/`` knows no family and
no adapters; a training checkpoint with LoRA/DoRA adapters is loaded here with the adapters
merged into the weights.

Checkpoint metadata (``vlm_bridge.json``) is written by :func:`conversion_meta` for imports and
training saves alike, so what conversion needs later (key layout, expert layout) is never lost.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from megatron.core import parallel_state

from vlm_bridge.convert import passthrough
from vlm_bridge.convert.distribute import global_param_names
from vlm_bridge.convert.engine import (
    DTYPES,
    META_FILE,
    HFParamSource,
    HFTarget,
    check_coverage,
    dtype_name,
    fill_from_hf,
    load_in_place,
    open_hf_weights,
    read_meta,
    save_megatron,
    write_hf,
)
from vlm_bridge.convert.experts import PER_EXPERT
from vlm_bridge.convert.hf_io import CheckpointError, refuse_output_over_input
from vlm_bridge.convert.layout import detect_layout, layout_by_name
from vlm_bridge.convert.ops import Entry
from vlm_bridge.convert.streaming import CheckpointParams
from vlm_bridge.convert.tied import split_tied_copies
from vlm_bridge.families.base import Family
from vlm_bridge.parallel import ParallelConfig, device, init_distributed
from vlm_bridge.registry import family_for_config, foreign_form


@dataclass
class BuiltModel:
    """A model for this rank plus everything needed to convert it."""

    family: Family
    hf_config: object
    settings: object
    model: torch.nn.Module
    table: list[Entry]
    params: dict[str, torch.nn.Parameter]
    key_layout: str = "hub"  # on-disk layout of the HF source, reproduced on export
    hf_side_dir: str = ""  # folder with config, tokenizer and processor files
    expert_layout: str = PER_EXPERT  # how MoE experts are stored on disk (convert/experts.py)
    # non-weight tensors of the source folder, written back on export (convert/passthrough.py)
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    # stored copies of a tied output layer: {embedding's file key: the copy's} (convert/tied.py)
    tied_copies: dict[str, str] = field(default_factory=dict)
    # set instead of filling the parameters: converts them one at a time (streaming import)
    source: HFParamSource | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def num_experts(self) -> int:
        return getattr(self.model.language_model.config, "num_moe_experts", None) or 0


def conversion_meta(built: BuiltModel, parallel: ParallelConfig, **extra) -> dict:
    """``vlm_bridge.json`` contents: everything export and verify need to reproduce the source."""
    return {
        "family": built.family.name,
        "dtype": dtype_name(built.dtype),
        "key_layout": built.key_layout,
        "expert_layout": built.expert_layout,
        "saved_tp": parallel.tp,
        "saved_pp": parallel.pp,
        "saved_ep": parallel.ep,
        "passthrough": passthrough.to_json(built.passthrough),
        "tied_copies": built.tied_copies,
        **extra,
    }


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_folder(value: str) -> str:
    """A model as users name it, as the folder to read: a folder as it is; a hub cache entry
    (``models--org--name``) as the snapshot its ``refs/main`` names; a hub id (``org/name``) that
    is no folder here as its snapshot in the local Hugging Face cache (``HF_HOME`` /
    ``HF_HUB_CACHE``). Nothing is downloaded."""
    folder = Path(value)
    if (folder / "config.json").is_file():
        return value
    if (folder / "snapshots").is_dir():
        ref = folder / "refs" / "main"
        if ref.is_file():
            main = folder / "snapshots" / ref.read_text().strip()
            return str(main) if (main / "config.json").is_file() else value  # _raw_config says so
        snapshots = list((folder / "snapshots").glob("*/config.json"))
        return str(snapshots[0].parent) if len(snapshots) == 1 else value  # else _raw_config names them
    if not folder.exists() and _REPO_ID.fullmatch(value):
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(value, local_files_only=True)
        except LocalEntryNotFoundError:
            entry = Path(HF_HUB_CACHE) / ("models--" + value.replace("/", "--"))
            example = _snapshot_example(entry)
            if example:  # a download of a pinned revision leaves no refs/main
                raise CheckpointError(f"{value}: its cache entry {entry} has no refs/main naming a "
                                      f"complete snapshot; pass a snapshot folder, e.g. {example}") from None
            raise CheckpointError(f"{value}: no such folder, and not in the local Hugging Face cache "
                                  f"({HF_HUB_CACHE}); download it first (hf download {value}) or pass "
                                  "its folder") from None
    return value


FOREIGN_MEGATRON = ("it is a Megatron-LM / Megatron Bridge checkpoint, whose layout vlm-bridge does not "
                    "read: export it to Hugging Face with the tool that wrote it, then run vlm-bridge "
                    "import")


def foreign_megatron(folder: Path) -> bool:
    """A Megatron-LM / Megatron Bridge save: its tracker file, or an ``iter_*`` folder of one."""
    tracker = "latest_checkpointed_iteration.txt"
    inside = folder.name.startswith("iter_") and (folder.parent / tracker).is_file()
    return (folder / tracker).is_file() or inside


def _snapshot_example(entry: Path) -> Path | None:
    """A snapshot with a config of a hub cache entry, to name in a message (the last by name)."""
    snapshots = sorted((entry / "snapshots").glob("*/config.json"))
    return snapshots[-1].parent if snapshots else None


def _raw_config(folder: str | Path) -> tuple[Path, dict]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        example = _snapshot_example(Path(folder))
        hint = (f"; it is a hub cache folder whose refs/main names no complete snapshot (or that has "
                f"no refs/main): pass one of its snapshots, e.g. {example}" if example else "")
        if (Path(folder) / META_FILE).is_file() or (Path(folder) / "checkpoints").is_dir():
            hint = "; it is a vlm-bridge Megatron checkpoint or run: pass it as --megatron-path"
        if foreign_megatron(Path(folder)):
            hint = f"; {FOREIGN_MEGATRON}"
        if not Path(folder).exists():
            raise CheckpointError(f"{folder}: no such folder (a Hugging Face model folder was expected)")
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder){hint}")
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None


def checkpoint_dtype(reader) -> torch.dtype:
    """The floating dtype that holds most of the checkpoint's bytes (a folder may keep a few
    tensors, e.g. norms or the output layer, in fp32 beside bf16 weights)."""
    held: dict[torch.dtype, int] = {}
    for name in reader.keys():
        dtype = reader.dtype(name)
        if dtype.is_floating_point:
            held[dtype] = held.get(dtype, 0) + math.prod(reader.shape(name)) * dtype.itemsize
    return max(held, key=held.get) if held else torch.float32


def load_hf_config(folder: str | Path):
    """The folder's config as transformers reads it, or, for a family's foreign form (a folder
    that needs its own code), translated into the family's transformers-native config."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path, raw = _raw_config(folder)
    _refuse_unsupported_config(path, raw)
    form = foreign_form(raw)
    # transformers validates configs (field types, layer types) with its own exception classes
    invalid = (KeyError, TypeError, ValueError, StrictDataclassError)
    try:
        if form is not None:
            return form.config(raw)
        # Never the folder's own code: transformers would otherwise ask on the terminal and wait.
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except invalid as exc:
        reason = " ".join(str(exc).split())  # one line
        raise CheckpointError(f"{path}: {reason}") from None
    _refuse_ignored_top_level_settings(path, raw, config)
    return config


# Language-model settings a flattened config may hold at its top level.
_TEXT_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings")


def _refuse_ignored_top_level_settings(path: Path, raw: dict, config) -> None:
    """A config whose language-model settings stand at the top level, where its config class does
    not read them (some classes move them into ``text_config`` when it is absent; with an empty or
    partial ``text_config``, or in other classes, its defaults stay, and a model of another size is
    built, whose every weight then mismatches): one line naming the settings, instead of hundreds
    of missing tensors later."""
    text = getattr(config, "text_config", None)
    if text is None:
        return
    given = raw.get("text_config") or {}  # may be absent, null, empty or partial
    ignored = [key for key in _TEXT_SIZES
               if key in raw and key not in given and getattr(text, key, raw[key]) != raw[key]]
    if ignored:
        found = ", ".join(f"{key}={raw[key]}" for key in ignored)
        used = ", ".join(f"{key}={getattr(text, key)}" for key in ignored)
        raise CheckpointError(
            f"{path}: {found} stand at the top level, where transformers does not read them for "
            f"model_type {raw.get('model_type')!r}: they belong under \"text_config\" (read as it is, the "
            f"model would have {used})")


def load_processor(folder: str | Path):
    """The folder's processor: transformers' own, or the family's for a foreign form."""
    from transformers import AutoProcessor

    _, raw = _raw_config(folder)
    form = foreign_form(raw)
    if form is not None:
        processor = form.processor(Path(folder), raw)
    else:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not tokenizer("hello")["input_ids"]:
        # transformers builds an empty tokenizer when the folder has none: every text would encode
        # to nothing (a folder of weights and configs only, or a checkpoint saved without it)
        raise CheckpointError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json missing); "
                              "copy the tokenizer files from the model's original folder")
    if not getattr(processor, "chat_template", None):
        # Folders saved before processors had templates of their own keep it with the tokenizer.
        processor.chat_template = getattr(tokenizer, "chat_template", None)
    if not processor.chat_template:  # every prompt here is rendered through it
        raise CheckpointError(f"{folder}: no chat template (chat_template.jinja, chat_template.json, "
                              f"or chat_template in tokenizer_config.json)")
    return processor


def load_hf_model(folder: str | Path, **kwargs):
    """The HF model of a folder (``from_pretrained`` kwargs pass through), built from
    :func:`load_hf_config`'s config so that foreign forms load with transformers' own classes."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        folder, config=load_hf_config(folder), local_files_only=True, **kwargs)


def _refuse_unsupported_config(path: Path, raw: dict) -> None:
    """One line for a config no family reads, before transformers tries (and, for a folder that
    ships its own modelling code, prompts)."""
    declared = SimpleNamespace(architectures=raw.get("architectures"), model_type=raw.get("model_type"))
    try:
        family_for_config(declared)
    except ValueError as exc:
        remote = " needs the folder's own Python code (auto_map), which is never run here;" if raw.get(
            "auto_map") else ""
        raise CheckpointError(f"{path}:{remote} {exc}") from None


def check_context_parallel(family: Family, parallel: ParallelConfig) -> None:
    if parallel.cp > 1 and family.no_context_parallel:
        # the same layout comes from --cp or, in finetune, parallel.cp
        raise ValueError(f"context parallelism {parallel.cp} (--cp, or parallel.cp in finetune): the "
                         f"{family.name} family does not support it: {family.no_context_parallel}")


def build_rank_model(hf_config, dtype: torch.dtype, parallel: ParallelConfig) -> BuiltModel:
    """This rank's Megatron model (pre/post-process by pipeline stage) and the family table."""
    family = family_for_config(hf_config)
    check_context_parallel(family, parallel)
    language, vision, settings = family.build_configs(
        hf_config, dtype, parallel.tp, parallel.pp, parallel.ep
    )
    model = family.build_model(
        language, vision, settings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    # Plain torch submodules (patch embedding, torch norms) start on the CPU in fp32.
    model.to(device=device(), dtype=dtype)
    # Freeze flags, per-component learning rates and LoRA select parameters by these prefixes.
    model.component_prefixes = dict(family.components)
    table = family.weight_table(language, vision, settings)
    params = global_param_names(model, buffers={entry.megatron for entry in table})
    for entry in table:  # tensors HF keeps in fp32 stay fp32 here too (filled after this)
        if entry.fp32 and entry.megatron in params:
            params[entry.megatron].data = params[entry.megatron].data.float()
    return BuiltModel(family, hf_config, settings, model, table, params)


def load_hf(hf_dir: str, parallel: ParallelConfig, dtype: torch.dtype | None,
            fill: bool = True) -> BuiltModel:
    """Build this rank's model and fill it from an HF folder (conversion on the fly).

    ``dtype`` None keeps the checkpoint's own dtype. ``fill=False`` checks everything but leaves the
    parameters unwritten (not resident) and sets ``built.source`` to convert them one by one.
    """
    hf_config = load_hf_config(hf_dir)
    family_for_config(hf_config)  # unsupported architectures fail before any file is opened
    text = getattr(hf_config, "text_config", hf_config)
    reader, expert_layout = open_hf_weights(hf_dir, text.hidden_size)
    built = build_rank_model(hf_config, dtype or checkpoint_dtype(reader), parallel)
    keys, constants = passthrough.split_keys(reader.keys(), built.family.passthrough)
    layout = detect_layout(built.family.layouts, keys, built.table)
    table = layout.table(built.table)
    keys, built.tied_copies = split_tied_copies(keys, table, layout, reader, hf_dir)
    check_coverage(table, keys, layout, hf_dir)
    built.passthrough = {name: reader.get(name) for name in constants}
    for name, tensor in built.passthrough.items():
        if built.family.check_passthrough is not None:
            built.family.check_passthrough(built.hf_config, name, tensor)
    if fill:
        fill_from_hf(built.params, table, reader, layout, hf_dir)
    else:
        built.source = HFParamSource(built.params, table, reader, layout, hf_dir)
    built.key_layout, built.hf_side_dir = layout.name, str(hf_dir)
    built.expert_layout = expert_layout
    return built


def _build_for_checkpoint(megatron_dir: str, parallel: ParallelConfig, dtype: torch.dtype | None):
    """This rank's model for a Megatron checkpoint, parameters not yet read."""
    meta = read_meta(megatron_dir)
    hf_config = load_hf_config(Path(megatron_dir) / "hf")
    dtype = dtype or DTYPES[meta["dtype"]]
    built = build_rank_model(hf_config, dtype, parallel)
    built.key_layout, built.hf_side_dir = meta["key_layout"], str(Path(megatron_dir) / "hf")
    built.expert_layout = meta.get("expert_layout", PER_EXPERT)
    built.passthrough = passthrough.from_json(meta.get("passthrough", {}))
    built.tied_copies = dict(meta.get("tied_copies", {}))
    return built, meta


def load_megatron(megatron_dir: str, parallel: ParallelConfig, dtype: torch.dtype | None = None,
                  merge: bool = True):
    """Build this rank's model at ``parallel`` and load a checkpoint saved at any layout (LoRA/DoRA
    adapters folded in unless ``merge`` is false)."""
    built, meta = _build_for_checkpoint(megatron_dir, parallel, dtype)
    peft = meta.get("peft")
    if peft:  # a LoRA/DoRA training checkpoint: load the adapters too and fold them in
        from vlm_bridge.peft.lora import LoraConfig, apply_lora, merge_lora

        apply_lora(built.model, LoraConfig(
            rank=peft["rank"], alpha=peft["alpha"], targets=tuple(peft["targets"]),
            components=tuple(peft["components"]), use_dora=peft["method"] == "dora"))
    load_in_place(built.model, f"{megatron_dir}/weights")
    if peft and merge:
        merge_lora(built.model)
    return built, meta


def load_pretrained(path: str, parallel: ParallelConfig, dtype: torch.dtype | None) -> BuiltModel:
    """An HF folder or a vlm-bridge Megatron checkpoint, at this run's layout."""
    if not path:
        raise ValueError("no pretrained model given (--pretrained DIR)")
    if (Path(path) / META_FILE).is_file():
        return load_megatron(path, parallel, dtype)[0]
    return load_hf(path, parallel, dtype)


def write_built(built: BuiltModel, hf_dir: str | Path, out_dtype: torch.dtype, overwrite: bool,
                max_shard_bytes: int = 2 * 1024**3, consume: bool = False,
                stream: CheckpointParams | None = None) -> None:
    """Run on every rank: export this model to an HF folder in its source's key/expert layout."""
    layout = layout_by_name(built.family.layouts, built.key_layout)
    target = HFTarget(
        folder=Path(hf_dir), layout=layout,
        dtype=out_dtype, side_dir=built.hf_side_dir, expert_layout=built.expert_layout,
        num_experts=built.num_experts, max_shard_bytes=max_shard_bytes, copies=built.tied_copies,
    )
    write_hf(built.params, layout.table(built.table), target, overwrite, consume=consume,
             extra=built.passthrough, stream=stream)


def import_hf(
    hf_dir: str, out_dir: str, parallel: ParallelConfig, dtype_arg: str | None, overwrite: bool
) -> dict:
    """Run on every rank: convert an HF folder into a Megatron distributed checkpoint."""
    init_distributed(parallel)
    _raw_config(hf_dir)  # the input is named first (swapped options would name the output)
    out = Path(out_dir)
    refuse_output_over_input(out, {"--hf-model": hf_dir})
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; pass --overwrite to replace it")
    if (out / "config.json").is_file() and not (out / META_FILE).is_file():
        raise CheckpointError(f"output directory {out} is a Hugging Face model folder; --overwrite "
                              "replaces a vlm-bridge checkpoint only: choose another folder")
    # Streaming: each parameter is converted when the checkpoint writer reaches it.
    built = load_hf(hf_dir, parallel, DTYPES[dtype_arg] if dtype_arg else None, fill=False)
    meta = conversion_meta(built, parallel)
    save_megatron(built.model, out, meta, hf_dir, overwrite, source=built.source)
    return meta


def export_hf(
    megatron_dir: str, hf_dir: str, parallel: ParallelConfig, dtype_arg: str | None,
    overwrite: bool, max_shard_bytes: int = 2 * 1024**3, expert_layout: str | None = None,
) -> dict:
    """Run on every rank: write an HF folder from a Megatron checkpoint (rank 0 writes)."""
    init_distributed(parallel)
    refuse_output_over_input(hf_dir, {"--megatron-path": megatron_dir})
    if Path(hf_dir).exists() and not overwrite:
        raise CheckpointError(f"output directory {hf_dir} already exists; pass --overwrite to replace it")
    if (Path(hf_dir) / META_FILE).is_file():
        raise CheckpointError(f"output directory {hf_dir} is a vlm-bridge Megatron checkpoint; --overwrite "
                              "replaces a Hugging Face model folder only: choose another folder")
    built, meta = _build_for_checkpoint(megatron_dir, parallel, None)
    stream = None
    if meta.get("peft"):  # adapters are merged into the whole model first
        built, meta = load_megatron(megatron_dir, parallel)
    else:  # streaming: the writer reads a few parameters at a time and frees them once written
        stream = CheckpointParams(built.model, built.params, f"{megatron_dir}/weights")
    out_dtype = DTYPES[dtype_arg or meta["dtype"]]
    if expert_layout:
        if not any(".experts." in name for name, _ in built.model.named_parameters()):
            raise ValueError(f"--expert-layout applies to MoE models; {megatron_dir} has no experts")
        built.expert_layout = expert_layout
    write_built(built, hf_dir, out_dtype, overwrite, max_shard_bytes, consume=True, stream=stream)
    return {"family": built.family.name, "dtype": dtype_name(out_dtype), "key_layout": built.key_layout}
