"""The one sample schema of the data layer: a Hugging Face chat-content conversation.

Every source (JSON files, ``datasets`` tables, the dataset makers) is converted into this
schema, and the encoder accepts nothing else. Keeping a single schema means a new source only
has to produce conversations, and a new model family only has to bring a processor with a chat
template; neither has to know about the other::

    {"messages": [
        {"role": "user", "content": [
            {"type": "image", "image": "cat.png"},          # path (str/Path) or PIL.Image
            {"type": "video", "video": "clip.mp4"},         # file, folder of frames, list of PIL
            {"type": "text", "text": "What is shown?"},
        ]},
        {"role": "assistant", "content": "A cat."},         # content may be a plain string
    ]}

Validation is structural only (roles, item types, value types). Whether a file exists is
checked when the media is loaded, so a bad file is reported, or skipped, by the encoder.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "video")
CONTENT_TYPES = ("text", *MEDIA_TYPES)


def _is_pil(value: Any) -> bool:
    """PIL is imported lazily so that validating text-only data does not need it."""
    from PIL import Image

    return isinstance(value, Image.Image)


def _check_media_value(kind: str, value: Any) -> str | None:
    """Return why ``value`` cannot be a ``kind`` item, or None when it can."""
    if isinstance(value, str | Path):
        return None if str(value) else f"has an empty {kind} path"
    if _is_pil(value):
        return None
    from vlm_bridge.data.video import DecodedVideo

    if kind == "video" and isinstance(value, DecodedVideo):  # already decoded and sampled
        return None
    if kind == "video" and isinstance(value, list | tuple):
        if not value:
            return "has an empty video frame list"
        if all(_is_pil(frame) or isinstance(frame, str | Path) for frame in value):
            return None
        return "has a video frame list with items that are neither PIL images nor paths"
    if kind == "video" and hasattr(value, "shape"):  # [T, H, W, 3] array or tensor
        return None
    return f"has a {kind} of type {type(value).__name__}"


def _check_item(item: Any) -> str | None:
    """Return why a content item is malformed, or None when it is fine."""
    if not isinstance(item, Mapping):
        return f"is a {type(item).__name__}, not a dict"
    kind = item.get("type")
    if kind not in CONTENT_TYPES:
        return f"has type {kind!r} (expected one of {', '.join(CONTENT_TYPES)})"
    if kind not in item:
        return f"has no {kind!r} field"
    if kind == "text":
        return None if isinstance(item["text"], str) else "has a non-string text"
    return _check_media_value(kind, item[kind])


def validate_sample(sample: Any, where: str) -> None:
    """Raise ``ValueError`` with a one-line message if ``sample`` does not follow the schema.

    ``where`` names the sample in the message (e.g. ``"sample 12"`` or ``"data.jsonl line 3"``)
    so a bad row in a large file can be found without a debugger.
    """
    if not isinstance(sample, Mapping) or "messages" not in sample:
        raise ValueError(f"{where}: expected a dict with a 'messages' list")
    messages = sample["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: message {m} is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: message {m} has role {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}: message {m} content must be a string or a list of items")
        for i, item in enumerate(content):
            problem = _check_item(item)
            if problem:
                raise ValueError(f"{where}: message {m} item {i} {problem}")


def content_items(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Content as a list of items: a plain-string content becomes one text item.

    Processor chat templates are written for the list form; normalising here means the
    encoder renders every sample through the same template branch.
    """
    content = message["content"]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [dict(item) for item in content]


def iter_media(sample: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield ``(kind, value)`` for every image/video item, in conversation order."""
    for message in sample["messages"]:
        if isinstance(message["content"], str):
            continue
        for item in message["content"]:
            if item["type"] in MEDIA_TYPES:
                yield item["type"], item[item["type"]]


def template_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: list content, media items reduced to their type (the
    processor inserts its placeholders; the pixels go to the processor call separately)."""
    return [{"role": m["role"],
             "content": [{"type": i["type"]} if i["type"] in MEDIA_TYPES else i for i in content_items(m)]}
            for m in messages]
