"""Common dataset layouts, read into the one chat schema (:mod:`vlm_bridge.data.schema`).

Real training files come in a few shapes besides the schema itself; each is converted here, the
same way for JSON files and ``datasets`` tables:

* ShareGPT / LLaVA: ``{"conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from":
  "gpt", "value": "..."}], "image": "x.png"}``; each ``<image>`` / ``<video>`` placeholder takes the
  next file of ``image(s)`` / ``video(s)``; files of a kind no placeholder asks for open the first
  user turn (placeholders for some files only is an error: where the others go is not said);
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


def _file_value(value: Any) -> Any:
    """A media file as ``datasets`` writes an Image column to JSON (``{"bytes": null, "path":
    ...}``) as its path, or as its bytes opened as an image; any other value as it is."""
    if not isinstance(value, Mapping) or set(value) - {"bytes", "path"}:
        return value
    if isinstance(value.get("bytes"), bytes | bytearray):
        import io

        from PIL import Image

        return Image.open(io.BytesIO(value["bytes"]))
    return value["path"] if value.get("bytes") is None and value.get("path") else value


def _pool(sample: Mapping[str, Any], kind: str) -> list[Any]:
    """The sample-level files of ``kind``: ``images`` (a list) or ``image`` (one or a list)."""
    found = sample.get(f"{kind}s", sample.get(kind))
    if found is None:
        return []
    return [_file_value(v) for v in (found if isinstance(found, list | tuple) else [found])]


def _with_system(sample: dict[str, Any], messages: list[Any], where: str) -> list[Any]:
    """A top-level ``system`` field (LLaMA-Factory's and ms-swift's layouts) as the leading system
    turn; next to a system turn of the messages it is ambiguous, and refused."""
    system = sample.pop("system", None)
    if system in (None, ""):
        return messages
    if not isinstance(system, str):
        raise ValueError(f"{where}: 'system' is a {type(system).__name__}, not a string")
    if any(isinstance(m, Mapping) and m.get("role") in ("system", "developer") for m in messages):
        raise ValueError(f"{where}: has a 'system' field and a system turn in its messages; keep one")
    return [{"role": "system", "content": system}, *messages]


def _sharegpt_messages(sample: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    files = {kind: _pool(sample, kind) for kind in MEDIA_TYPES}
    texts = [t.get("value") for t in sample["conversations"] if isinstance(t, Mapping)]
    placeholders = [p for text in texts if isinstance(text, str) for p in PLACEHOLDER.findall(text)]
    for kind, found in files.items():
        wanted = placeholders.count(f"<{kind}>")
        if wanted > len(found) or 0 < wanted < len(found):  # files only open the turn when none is placed
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
        _fill_from_lists(sample, where)
    else:
        return sample
    if isinstance(sample["messages"], list):
        sample["messages"] = _with_system(sample, sample["messages"], where)
    return sample


def _fill_from_lists(sample: dict[str, Any], where: str) -> None:
    """Media items without a value take theirs, in order, from the sample's ``images`` / ``videos``
    lists. When a list holds more files than the messages have items of its kind, ``<image>`` /
    ``<video>`` in text items (LLaVA data written as messages) are placeholders too; files that
    no item or placeholder of their kind asks for open the first user turn, as in the ShareGPT
    layout (and TRL); more files than a sample's items and placeholders is an error."""
    files = {kind: _pool(sample, kind) for kind in MEDIA_TYPES}
    if any(files.values()):  # plain-string turns take files too: as one text item
        sample["messages"] = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                              if isinstance(m, Mapping) and isinstance(m.get("content"), str) else m
                              for m in sample["messages"]]
    for content, i in _items(sample["messages"]):
        if isinstance(content[i], dict):
            content[i] = _media_item(content[i])
            kind = content[i].get("type")
            if kind in MEDIA_TYPES and kind in content[i]:
                content[i][kind] = _file_value(content[i][kind])
    _refuse_unfilled_placeholders(sample["messages"], files, where)
    slots = {kind: 0 for kind in MEDIA_TYPES}
    for content, i in _items(sample["messages"]):
        item = content[i]
        if isinstance(item, dict) and item.get("type") in MEDIA_TYPES and item["type"] not in item:
            slots[item["type"]] += 1
    surplus = {kind for kind in MEDIA_TYPES if len(files[kind]) > slots[kind]}
    for message in sample["messages"] if surplus else []:  # text placeholders take files too
        if isinstance(message, Mapping) and isinstance(message.get("content"), list):
            message["content"] = [part for item in message["content"]
                                  for part in _split_placeholders(item, surplus)]
    pools = {kind: iter(found) for kind, found in files.items()}
    asked = {kind: 0 for kind in MEDIA_TYPES}
    for content, i in _items(sample["messages"]):
        item = content[i]
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in MEDIA_TYPES and kind not in item:
            asked[kind] += 1
            value = next(pools[kind], None)
            if value is not None:
                item[kind] = value
    unplaced = []
    for kind in MEDIA_TYPES:
        if asked[kind] > len(files[kind]):
            raise ValueError(f"{where}: {asked[kind]} {kind} item(s) or <{kind}> placeholder(s) in the "
                             f"messages but {len(files[kind])} file(s) in '{kind}s'; give one per file")
        left = list(pools[kind])
        if left and asked[kind]:
            raise ValueError(f"{where}: {len(files[kind])} file(s) in '{kind}s' but {asked[kind]} {kind} "
                             f"item(s) or <{kind}> placeholder(s) in the messages; give one per file")
        unplaced += [{"type": kind, kind: value} for value in left]
    first_user = next((m for m in sample["messages"] if isinstance(m, Mapping) and m.get("role") == "user"
                       and isinstance(m.get("content"), list)), None)
    if unplaced and first_user is None:
        raise ValueError(f"{where}: {len(unplaced)} file(s) in its media lists, and no user turn to "
                         "put them in")
    if unplaced:
        first_user["content"][:0] = unplaced


def _refuse_unfilled_placeholders(messages: list[Any], files: dict[str, list[Any]], where: str) -> None:
    """``<image>`` / ``<video>`` in a user turn of a sample with no file and no item of that kind:
    its media list was lost (a failed join, a dropped column), and the sample would train on
    the tag as text, about media the model never sees (the ShareGPT layout refuses it too). In an
    answer the tag is text (an answer about HTML, say)."""
    items = [content[i] for content, i in _items(messages) if isinstance(content[i], Mapping)]
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    texts = [m.get("content") for m in users]
    texts += [item.get("text") for content, i in _items(users) if isinstance(item := content[i], Mapping)
              and item.get("type") == "text"]
    for kind in MEDIA_TYPES:
        if files[kind] or any(item.get("type") == kind for item in items):
            continue
        tags = sum(text.count(f"<{kind}>") for text in texts if isinstance(text, str))
        if tags:
            raise ValueError(f"{where}: {tags} <{kind}> placeholder(s) in the messages but no file in "
                             f"'{kind}s'")


def _split_placeholders(item: Any, kinds: set[str]) -> list[Any]:
    """A text item around placeholders of ``kinds`` (``<image>``, ``<video>``) as text and empty
    media items."""
    if not (isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str)):
        return [item]
    pattern = re.compile("(" + "|".join(f"<{kind}>" for kind in sorted(kinds)) + ")")
    if not pattern.search(item["text"]):
        return [item]
    parts = []
    for part in pattern.split(item["text"]):
        if pattern.fullmatch(part):
            parts.append({"type": part[1:-1]})
        elif part.strip("\n"):
            parts.append({**item, "text": part.strip("\n")})
    return parts
