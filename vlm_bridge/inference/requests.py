"""Generation requests: chat-schema conversations -> left-padded processor batches.

A request is a conversation in the data layer's schema (:mod:`vlm_bridge.data.schema`). A trailing
assistant turn is the reference answer (what ``evaluate`` scores against); the prompt is every turn
before it, rendered by the checkpoint's own chat template with the generation prompt. Media are
loaded as the training encoder loads them (images, videos from files or folders of frames).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_bridge.convert.hf_io import write_text_atomic
from vlm_bridge.data.encode import PROCESSOR_MEDIA_ERRORS, render_chat
from vlm_bridge.data.media import load_image, load_video, local_media, processor_media, shown
from vlm_bridge.data.schema import content_items, iter_media, template_messages, validate_sample
from vlm_bridge.data.sources import load_json_samples


@dataclass
class Request:
    """One prompt: its turns (no trailing assistant turn), the reference answer if any, and where
    it came from (for messages)."""

    messages: list[dict[str, Any]]
    reference: str | None
    where: str

    @property
    def has_video(self) -> bool:
        return any(kind == "video" for kind, _ in iter_media({"messages": self.messages}))


def _text_of(message: dict[str, Any]) -> str:
    return "".join(item["text"] for item in content_items(message) if item["type"] == "text")


def request_from_sample(sample: dict[str, Any], where: str) -> Request:
    """Split a conversation into the prompt and its reference answer (a trailing assistant turn)."""
    validate_sample(sample, where)
    messages = list(sample["messages"])
    reference = None
    if messages[-1]["role"] == "assistant":
        reference = _text_of(messages.pop())
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt must end with a user turn")
    return Request(messages, reference, where)


def request_from_args(prompt: str, images: list[str], video: str | None) -> Request:
    """The request ``--prompt`` / ``--image`` / ``--video`` describe: one user turn. ``<image>`` /
    ``<video>`` in the prompt place the files as in LLaVA data; without them the media come first."""
    from vlm_bridge.data.layouts import normalize_sample

    if not prompt and not images and video is None:
        raise ValueError("--prompt is empty and no --image or --video was given")
    # an empty prompt with media asks about the media alone (e.g. a caption)
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}] if prompt else []
    sample = {"messages": [{"role": "user", "content": content}], "images": list(images),
              "videos": [video] if video is not None else []}
    if images or video is not None:  # without media a tag is text ("what does <video> do?")
        sample = normalize_sample(sample, "--prompt")
    return request_from_sample(sample, "--prompt")


def load_requests(path: str | Path) -> list[Request]:
    """Every conversation of a JSON/JSONL file (media paths relative to the file)."""
    return [request_from_sample(sample, f"{path} sample {i}")
            for i, sample in enumerate(load_json_samples(path))]


def ensure_pad_token(tokenizer) -> None:
    """Batches of different lengths need a pad token; many real tokenizers have none. Padded
    positions are masked out everywhere, so any existing token will do."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)


def build_prompt_batch(processor, requests: list[Request], video_fps: float | None = None,
                       **processor_kwargs):
    """One left-padded batch (HF ``BatchFeature``) of the requests' prompts, as HF generation takes.

    Images go per row (a nested list), which every processor accepts and some require.
    ``processor_kwargs`` go to the processor call (e.g. ``do_pan_and_scan=True``, which a saved
    processor folder cannot switch on) and win over the video reader's."""
    texts, images, videos = [], [], []
    for request in requests:
        plain = template_messages(request.messages)
        texts.append(render_chat(processor, plain, request.where, add_generation_prompt=True))
        row_images = []
        for kind, value in iter_media({"messages": request.messages}):
            try:
                if kind == "image":
                    row_images.append(load_image(value))
                else:
                    videos.append(load_video(value, processor, video_fps))
            except ValueError as exc:
                raise ValueError(f"{request.where}: {exc}") from None
        images.append(row_images)
    ensure_pad_token(getattr(processor, "tokenizer", processor))
    media = {**processor_media(images, videos, processor), **processor_kwargs}
    check_processor_kwargs(processor, processor_kwargs)
    # The rendered template already holds every special token (e.g. a <bos>): add none.
    try:
        return processor(text=texts, padding=True, padding_side="left", return_tensors="pt",
                         add_special_tokens=False, **media)
    except Exception as exc:  # noqa: BLE001 - named below as the user's options or media
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one line
        if processor_kwargs:
            raise ValueError(f"--processor-arg {processor_kwargs}: the processor rejected it "
                             f"({reason})") from None
        if not isinstance(exc, PROCESSOR_MEDIA_ERRORS) or not ((images and any(images)) or videos):
            raise
        where = ", ".join(dict.fromkeys(request.where for request in requests))
        named = [str(value) for request in requests for _, value in iter_media({"messages": request.messages})
                 if isinstance(value, str | Path)]
        media = f" {', '.join(named)}" if named else ""
        raise ValueError(f"{where}: the processor rejected the media{media} ({reason})") from None


def check_processor_kwargs(processor, kwargs: dict) -> None:
    """A processor option that the processor does not know is silently ignored by transformers;
    name it instead (the known ones: the processor's kwarg groups and its image / video
    processors' own options). A processor that lists none is not checked."""
    if not kwargs:
        return
    known = set()
    groups = getattr(processor, "valid_processor_kwargs", None)
    for group in _typed_dict_values(groups):
        known |= _typed_dict_keys(group)
    for part in ("image_processor", "video_processor"):
        known |= _typed_dict_keys(getattr(getattr(processor, part, None), "valid_kwargs", None))
    unknown = sorted(set(kwargs) - known) if known else []
    if unknown:
        raise ValueError(f"--processor-arg {', '.join(unknown)}: not an option of {type(processor).__name__} "
                         f"(e.g. {', '.join(sorted(known)[:6])}, ...)")


def _typed_dict_keys(typed) -> set[str]:
    """A TypedDict's keys, read without evaluating its annotations (which may name types their
    module never imports)."""
    if not isinstance(typed, type):
        return set()
    return set(getattr(typed, "__required_keys__", ())) | set(getattr(typed, "__optional_keys__", ()))


def _typed_dict_values(typed) -> list:
    import typing

    try:
        return list(typing.get_type_hints(typed).values()) if isinstance(typed, type) else []
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated: check nothing
        return []


def plan_batches(with_video: list[bool], batch_size: int, video_alone: bool) -> Iterator[list[int]]:
    """Indices per batch, in order, of items that hold a video or not; a family whose processor
    takes a video only as a prompt of its own (``video_batch_alone``) gets each video item in a
    batch by itself."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    current: list[int] = []
    for index, video in enumerate(with_video):
        if video_alone and video:
            if current:
                yield current
                current = []
            yield [index]
            continue
        current.append(index)
        if len(current) == batch_size:
            yield current
            current = []
    if current:
        yield current


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write every row, then rename: a failed run leaves no half-written file."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_media(requests: list[Request]) -> None:
    """Fail before any model loads when a media path does not exist."""
    for request in requests:
        for kind, value in iter_media({"messages": request.messages}):
            if not isinstance(value, str | Path):
                continue
            try:
                source = local_media(value, kind)
            except ValueError as exc:
                raise ValueError(f"{request.where}: {exc}") from None
            if isinstance(source, Path) and not source.exists():
                raise ValueError(f"{request.where}: {kind} {shown(value)} does not exist")
