"""Common dataset layouts, read into the one chat schema (:mod:`vlm_bridge.data.schema`).

Real training files come in a few shapes besides the schema itself; each is converted here, the
same way for JSON files and ``datasets`` tables:

* ShareGPT / LLaVA: ``{"conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from":
  "gpt", "value": "..."}], "image": "x.png"}``; each ``<image>`` / ``<video>`` placeholder takes the
  next file of ``image(s)`` / ``video(s)``; files without a placeholder open the first user turn;
* TRL and many hub VLM datasets: media items without a value (``{"type": "image"}``) take theirs,
  in order, from an ``images`` / ``videos`` list next to ``messages``;
* Arrow exports: every struct field present, the unused ones null (``{"type": "text", "text":
  "q", "image": null}``); nulls are dropped (a chat template would read a null ``image`` key as an
  image);
* item aliases that chat templates accept: ``{"type": "image", "path" | "url": ...}`` and the
  OpenAI form ``{"type": "image_url", "image_url": {"url": ...}}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from vlm_bridge.data.schema import MEDIA_TYPES

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"(<image>|<video>)")


def strip_nones(item: Any) -> Any:
    """Drop null fields of dicts, recursively (Arrow's unused struct fields)."""
    if isinstance(item, dict):
        return {k: strip_nones(v) for k, v in item.items() if v is not None}
    if isinstance(item, list):
        return [strip_nones(v) for v in item]
    return item


def _pool(sample: Mapping[str, Any], kind: str) -> list[Any]:
    """The sample-level files of ``kind``: ``images`` (a list) or ``image`` (one or a list)."""
    found = sample.get(f"{kind}s", sample.get(kind))
    if found is None:
        return []
    return list(found) if isinstance(found, list | tuple) else [found]


def _sharegpt_messages(sample: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    files = {kind: _pool(sample, kind) for kind in MEDIA_TYPES}
    texts = [t.get("value") for t in sample["conversations"] if isinstance(t, Mapping)]
    placeholders = [p for text in texts if isinstance(text, str) for p in PLACEHOLDER.findall(text)]
    for kind, found in files.items():
        wanted = placeholders.count(f"<{kind}>")
        if wanted > len(found):
            raise ValueError(f"{where}: {wanted} <{kind}> placeholders but {len(found)} {kind} file(s)")
    pools = {kind: iter(found) for kind, found in files.items()}
    messages = []
    for index, turn in enumerate(sample["conversations"]):
        if not isinstance(turn, Mapping):
            return sample["conversations"]  # malformed: validation names it
        role = turn.get("from", turn.get("role"))
        if "value" not in turn and "content" not in turn:
            raise ValueError(f"{where}: conversation turn {index} has no 'value'")
        text = turn.get("value", turn.get("content"))
        content: list[dict[str, Any]] = []
        for part in PLACEHOLDER.split(text) if isinstance(text, str) else [text]:
            if part in ("<image>", "<video>"):
                kind = part[1:-1]
                content.append({"type": kind, kind: next(pools[kind], None)})
            elif not isinstance(part, str) or part.strip("\n"):
                content.append({"type": "text", "text": part.strip("\n") if isinstance(part, str) else part})
        messages.append({"role": SHAREGPT_ROLES.get(role, role), "content": content})
    unplaced = [{"type": kind, kind: value} for kind in MEDIA_TYPES for value in pools[kind]]
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if unplaced and first_user is not None:
        first_user["content"][:0] = unplaced
    return messages


def _media_item(item: dict[str, Any]) -> dict[str, Any]:
    """Aliases of a media item's value, as the item the schema names."""
    if item.get("type") == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        return {"type": "image", "image": url} if url is not None else {"type": "image"}
    kind = item.get("type")
    if kind in MEDIA_TYPES and kind not in item:
        for alias in ("path", "url"):
            if item.get(alias) is not None:
                return {**{k: v for k, v in item.items() if k != alias}, kind: item[alias]}
    return item


def _items(messages: list[Any]) -> Iterator[tuple[list[Any], int]]:
    for message in messages:
        if isinstance(message, Mapping) and isinstance(message.get("content"), list):
            for i in range(len(message["content"])):
                yield message["content"], i


def normalize_sample(sample: Any, where: str = "sample") -> Any:
    """``sample`` in the chat schema when it comes in one of the layouts above; anything else is
    returned as it is, for validation to name what is wrong (``where`` names the sample in the
    errors found here)."""
    if not isinstance(sample, Mapping):
        return sample
    sample = dict(sample)
    # Absent, null or empty: datasets concatenated from both layouts fill the other key with null.
    given = [key for key in ("messages", "conversations") if sample.get(key) not in (None, [])]
    if len(given) == 2:
        raise ValueError(f"{where}: has both 'messages' and 'conversations'; keep one")
    if given == ["conversations"] and isinstance(sample["conversations"], list):
        sample["messages"] = _sharegpt_messages(sample, where)  # schema items already
    elif "messages" in sample and isinstance(sample["messages"], list):
        sample["messages"] = strip_nones(sample["messages"])
        pools = {kind: iter(_pool(sample, kind)) for kind in MEDIA_TYPES}
        for content, i in _items(sample["messages"]):
            if isinstance(content[i], dict):
                item = content[i] = _media_item(content[i])
                kind = item.get("type")
                if kind in MEDIA_TYPES and kind not in item:
                    value = next(pools[kind], None)
                    if value is not None:
                        item[kind] = value
    return sample
