"""A tied output layer that a folder stores anyway.

With ``tie_word_embeddings`` the output layer is the input embedding, and the weight tables have
no entry for it. Some folders still hold an ``lm_head.weight`` equal to the embeddings (older
``save_pretrained`` versions wrote both; transformers loads such a folder and ties it). Import
accepts that copy when it is bit-identical, and export writes it back under its own name, so the
round trip returns the same tensors. A copy that differs is refused: transformers would silently
replace it with the embeddings, which is not what its author meant.
"""

from __future__ import annotations

import torch

from vlm_bridge.convert.hf_io import CheckpointError
from vlm_bridge.convert.layout import KeyLayout
from vlm_bridge.convert.ops import Entry

OUTPUT_LAYER_SUFFIX = "lm_head.weight"
EMBEDDING_SUFFIX = "embedding.word_embeddings.weight"


def split_tied_copies(keys: list[str], table: list[Entry], layout: KeyLayout, reader,
                      where: str) -> tuple[list[str], dict[str, str]]:
    """``keys`` without the stored copies of a tied output layer, and ``{embedding's file key:
    the copy's file key}`` for export to write it back."""
    used = {layout.to_file(name) for entry in table for name in entry.hf}
    embedding = next((layout.to_file(entry.hf[0]) for entry in table
                      if entry.megatron.endswith(EMBEDDING_SUFFIX) and len(entry.hf) == 1), None)
    if embedding is None or embedding not in keys:
        return keys, {}
    copies = {}
    for key in keys:
        if key in used or not key.endswith(OUTPUT_LAYER_SUFFIX):
            continue
        if reader.shape(key) != reader.shape(embedding) or reader.dtype(key) != reader.dtype(embedding):
            continue  # not a copy: the coverage check names it as an unexpected tensor
        if not torch.equal(reader.get(key, copy=False), reader.get(embedding, copy=False)):
            raise CheckpointError(f"{where}: {key} differs from {embedding}, but the config ties the output "
                                  f"layer to the embeddings (tie_word_embeddings), which would discard it")
        copies[embedding] = key
    return [key for key in keys if key not in copies.values()], copies
