"""A processor for ``NemotronH_Nano_VL_V2`` hub folders, built from transformers classes.

V2 folders name their own processing code (``auto_map``), which is never run here. What V2
does, rebuilt natively:

* images are cut into square tiles of ``force_image_size`` pixels (512): the grid of at most
  ``max_num_tiles`` (12) tiles whose aspect ratio is closest to the image's, then a thumbnail of
  the whole image when there is more than one tile (InternVL's tiling, which transformers' GOT-OCR2
  image processor implements);
* every image becomes ``<img>`` + ``<image>`` x (tokens per tile x tiles) + ``</img>``, with
  ``(tile / patch)^2 / 4`` tokens per tile (256 at 512 px) after the 0.5 pixel shuffle;
* a video becomes its frames, each squashed into one tile, labelled
  ``Frame {i} sampled at {t:.2f} seconds: `` and joined by newlines; frames are used as given
  (V2 leaves frame sampling to the caller).

The outputs are those of the family's native processor (``pixel_values`` as rows of flattened
16x16 patches and one ``image_grid_hw`` row per tile), so the model runs every tile as an image;
images and video frames share one tensor in prompt order and may share a batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
from transformers.models.nemotron_h_omni.image_processing_nemotron_h_omni import convert_image_to_patches
from transformers.video_processing_utils import BaseVideoProcessor

DEFAULT_MAX_TILES = 12


class TileImageProcessor(GotOcr2ImageProcessor):
    """InternVL tiles of ``size`` with a thumbnail: ``pixel_values`` [tiles, 3, H, W] and
    ``num_patches`` (tiles per image, thumbnail included)."""

    crop_to_patches = True
    use_thumbnail = True

    def crop_image_to_patches(self, images, min_patches, max_patches, use_thumbnail=True, patch_size=None,
                              resample=None):
        return super().crop_image_to_patches(images, min_patches, max_patches, self.use_thumbnail,
                                             patch_size, resample)


class FrameVideoProcessor(BaseVideoProcessor):
    """Every given frame resized to one tile and normalised; no sampling (V2 leaves it to the
    caller)."""

    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = False
    model_input_names = ["pixel_values_videos"]


def _seconds_label(index: int, metadata: Any) -> str:
    """``Frame i sampled at t seconds: `` as V2 labels frames (``t`` from the frame's index in
    the source and whole milliseconds per frame), ``Frame i: `` without a frame rate."""
    def field(key: str):  # a dict from the caller or transformers' VideoMetadata
        return metadata.get(key) if isinstance(metadata, Mapping) else getattr(metadata, key, None)

    fps = field("fps")
    if not fps:
        return f"Frame {index + 1}: "
    indices = field("frames_indices")
    source_index = int(indices[index]) if indices is not None and index < len(indices) else index
    return f"Frame {index + 1} sampled at {source_index * int(1000 / fps) / 1000:.2f} seconds: "


class NemotronV2Processor:
    """Tiles, frames and prompt expansion of V2 (see the module docstring); chat template and
    tokenizer from the folder."""

    def __init__(self, image_processor: TileImageProcessor, video_processor: FrameVideoProcessor,
                 tokenizer: Any, *, patch_size: int, downsample_ratio: float,
                 image_token: str = "<image>", image_start_token: str = "<img>",
                 image_end_token: str = "</img>", video_token: str = "<video>") -> None:
        self.image_processor, self.video_processor = image_processor, video_processor
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template
        self.patch_size = patch_size
        self.merge = round(1 / downsample_ratio)
        self.image_token = image_token
        self.image_start_token, self.image_end_token = image_start_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        # Frames fill the image placeholder, so no video token appears in the sequence; the
        # <video> placeholder is text the chat template writes (often not a token at all).
        self.video_token_id = None
        self._placeholder = re.compile(f"({re.escape(image_token)})|({re.escape(video_token)})")

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def _tile_run(self, tiles: torch.Tensor) -> str:
        rows, cols = tiles.shape[-2] // self.patch_size, tiles.shape[-1] // self.patch_size
        per_tile = rows * cols // self.merge**2
        return self.image_start_token + self.image_token * (per_tile * tiles.shape[0]) + self.image_end_token

    def _images(self, images) -> list[torch.Tensor]:
        flat = [im for row in images for im in (row if isinstance(row, list | tuple) else [row])]
        if not flat:
            return []
        out = self.image_processor(images=flat, return_tensors="pt")
        return list(torch.split(out["pixel_values"], [int(n) for n in out["num_patches"]]))

    def _videos(self, videos) -> list[torch.Tensor]:
        return [self.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
                for video in videos]

    def __call__(self, text=None, images=None, videos=None, video_metadata=None, return_tensors=None,
                 do_sample_frames: bool | None = None, **text_kwargs) -> BatchFeature:
        if do_sample_frames:
            raise ValueError("this processor does not sample frames: pass the frames to use")
        texts = [text] if isinstance(text, str) else list(text or [])
        image_tiles = self._images(images or [])
        frame_tiles = self._videos(videos or [])
        metadata = list(video_metadata or [None] * len(frame_tiles))
        used: list[torch.Tensor] = []
        counts = {"image": 0, "video": 0}

        def expand(match: re.Match) -> str:
            kind = "image" if match.group(1) else "video"
            index = counts[kind]
            items = image_tiles if kind == "image" else frame_tiles
            if index >= len(items):
                raise ValueError(f"more {kind} placeholders in the text than {kind}s given ({len(items)})")
            counts[kind] += 1
            if kind == "image":
                used.append(items[index])
                return self._tile_run(items[index])
            frames = items[index]
            used.append(frames)
            return "\n".join(_seconds_label(i, metadata[index]) + self._tile_run(frames[i : i + 1])
                             for i in range(frames.shape[0]))

        expanded = [self._placeholder.sub(expand, t) for t in texts]
        if counts["image"] != len(image_tiles) or counts["video"] != len(frame_tiles):
            raise ValueError(f"{len(image_tiles)} images and {len(frame_tiles)} videos given, but the text "
                             f"has {counts['image']} image and {counts['video']} video placeholders")
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs))
        if used:
            tiles = torch.cat(used)
            rows = convert_image_to_patches(tiles, self.patch_size)
            data["pixel_values"] = rows.flatten(0, 1)
            grid = [tiles.shape[-2] // self.patch_size, tiles.shape[-1] // self.patch_size]
            data["image_grid_hw"] = torch.tensor([grid] * tiles.shape[0])
        return BatchFeature(data=data, tensor_type=return_tensors)


def load_v2_processor(folder: Path, raw: dict) -> NemotronV2Processor:
    """The processor of a V2 hub folder from its ``config.json`` (``raw``: tile size, patch, pixel
    shuffle, statistics, thumbnail, token strings), its ``preprocessor_config.json``
    (``max_num_tiles``, when present) and its tokenizer files."""
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    tile = int(raw.get("force_image_size") or 512)
    stats = {"image_mean": list(raw.get("norm_mean") or OPENAI_CLIP_MEAN),
             "image_std": list(raw.get("norm_std") or OPENAI_CLIP_STD)}
    max_tiles = int(pre.get("max_num_tiles") or raw.get("max_dynamic_patch") or DEFAULT_MAX_TILES)
    image_processor = TileImageProcessor(size={"height": tile, "width": tile}, min_patches=1,
                                         max_patches=max_tiles, **stats)
    image_processor.use_thumbnail = bool(raw.get("use_thumbnail", True))
    video_processor = FrameVideoProcessor(size={"height": tile, "width": tile}, **stats)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return NemotronV2Processor(
        image_processor, video_processor, tokenizer,
        patch_size=int(raw.get("patch_size", 16)),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        image_token=raw.get("img_context_token", "<image>"),
        image_start_token=raw.get("img_start_token", "<img>"),
        image_end_token=raw.get("img_end_token", "</img>"),
        video_token=raw.get("video_context_token", "<video>"),
    )
