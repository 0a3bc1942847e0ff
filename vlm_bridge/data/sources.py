"""Sources of schema samples: JSON files, ``datasets`` tables and makers for known datasets.

Every function here yields samples in the one schema of :mod:`vlm_bridge.data.schema`, so the
encoder never sees a dataset-specific column. Makers take ``path`` (a hub name, or a local
directory written by ``save_to_disk`` or holding data files) so the same code runs on the real
dataset and on small local copies in tests. ``load_source`` turns a command-line string such as
``"jsonl:train.jsonl"``, ``"hf:DIR"`` or ``"cord_v2"`` into one of these iterators.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vlm_bridge.data.layouts import normalize_sample
from vlm_bridge.data.schema import MEDIA_TYPES, validate_sample

Sample = dict[str, Any]


# --- JSON files ------------------------------------------------------------------------------


class _MediaRoot:
    """Where one data source's relative media paths are read from: its folder, so a dataset folder
    can move; or, when a path is missing there but present under the working directory, the
    working directory (ms-swift's and many scripts' convention: paths relative to where training
    is launched). Decided at the first path found in either place and kept for the source: a
    check per path would stat every file of a large dataset while it loads."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.chosen = folder, None

    def __call__(self, path: Path) -> Path:
        if self.chosen is None:
            try:
                if (self.folder / path).exists():
                    self.chosen = self.folder
                elif path.exists():
                    self.chosen = Path.cwd()
            except OSError:  # no file name at all (raw base64 runs past the name limit): the loader says so
                pass
        return (self.chosen or self.folder) / path


def _resolve(value: Any, root: _MediaRoot) -> Any:
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    if isinstance(value, str) and "://" not in value and not value.startswith("data:"):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else root(path))
    return value


def _resolve_media_paths(sample: Sample, root: _MediaRoot) -> Sample:
    for message in sample.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            for item in message["content"]:
                if isinstance(item, dict) and item.get("type") in MEDIA_TYPES and item.get("type") in item:
                    item[item["type"]] = _resolve(item[item["type"]], root)
    return sample


def load_json_samples(path: str | Path) -> Iterator[Sample]:
    """Samples from a ``.jsonl`` file (one per line) or a ``.json`` file (a list).

    Each sample is read into the schema when it comes in a common layout (ShareGPT/LLaVA, TRL,
    Arrow exports: :mod:`vlm_bridge.data.layouts`) and validated (errors name the file and line /
    index), and relative image and video paths are resolved against the file's folder. A UTF-8
    byte-order mark (Windows tools write one) is ignored.
    """
    path = Path(path).expanduser()
    root = _MediaRoot(path.resolve().parent)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.name} line {number}"
                try:
                    sample = normalize_sample(json.loads(line), where)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
                validate_sample(sample, where)
                yield _resolve_media_paths(sample, root)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path.name}: invalid JSON ({exc.msg} at line {exc.lineno} column "
                             f"{exc.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path.name}: expected a JSON list of samples")
        for index, sample in enumerate(data):
            sample = normalize_sample(sample, f"{path.name} sample {index}")
            validate_sample(sample, f"{path.name} sample {index}")
            yield _resolve_media_paths(sample, root)
    else:
        raise ValueError(f"{path}: expected a .jsonl or .json file")


# --- datasets --------------------------------------------------------------------------------


def load_hf_dataset(
    name_or_dir: str | Path, split: str = "train", subset: str | None = None, **load_kwargs: Any
) -> Any:
    """One split of a ``datasets`` dataset: a hub name or a local directory.

    A local directory written by ``save_to_disk`` is opened with ``load_from_disk`` (which
    ``load_dataset`` refuses); any other directory or name goes through ``load_dataset``
    (a folder of parquet/json/... files, with or without a README naming configs and splits as
    hub datasets do, or the hub itself). In a local directory without such a README, ``subset``
    names a sub-folder, the usual on-disk copy of one config of a dataset like the_cauldron.
    Extra keywords (``cache_dir``, ``streaming``, ...) go to ``load_dataset``.
    """
    from datasets.exceptions import DatasetGenerationError

    if Path(name_or_dir).is_file() and Path(name_or_dir).stat().st_size == 0:
        raise ValueError(f"data source {name_or_dir}: the file is empty")
    try:
        return _load_hf_dataset(name_or_dir, split, subset, **load_kwargs)
    except StopIteration as err:  # datasets' JSON builder reading the first rows of an empty file
        raise ValueError(f"data source {name_or_dir}: holds no rows (an empty data file?)") from err
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' words for a header-only CSV
            raise ValueError(f"data source {name_or_dir}: holds no rows") from err
        raise
    except DatasetGenerationError as err:  # a bad file among a folder's, files of several schemas
        cause = err.__cause__ or err
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ValueError(f"data source {name_or_dir}: datasets could not read it as one table "
                         f"({type(cause).__name__}: {detail}); its data files must share one "
                         "schema, with nothing else of their kind in the folder") from err


def _load_hf_dataset(name_or_dir: str | Path, split: str, subset: str | None, **load_kwargs: Any) -> Any:
    import datasets

    root = Path(name_or_dir)
    if root.is_dir():
        if subset is not None and (root / subset).is_dir() and not (root / "README.md").exists():
            root, subset = root / subset, None  # <dir>/<subset>/ without a card naming configs
        if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
            loaded = datasets.load_from_disk(str(root))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{root}: no split {split!r} (has {', '.join(loaded)})")
                return loaded[split]
            return loaded
        name_or_dir = root
    elif root.is_file():  # one data file: its format's builder (a folder or a name finds it itself)
        builder = DATA_FILE_BUILDERS.get(root.suffix.lower().lstrip("."))
        if builder is None:
            raise ValueError(f"{root}: not a data file datasets reads by name "
                             f"({', '.join('.' + e for e in DATA_FILE_BUILDERS)}); pass its folder")
        return datasets.load_dataset(builder, data_files={split: str(root)}, split=split, **load_kwargs)
    return datasets.load_dataset(str(name_or_dir), subset, split=split, **load_kwargs)


# A data file's extension -> the datasets builder that reads it.
DATA_FILE_BUILDERS = {"parquet": "parquet", "arrow": "arrow", "csv": "csv",
                      "json": "json", "jsonl": "json"}


def row_to_sample(row: Mapping[str, Any], where: str = "row") -> Sample:
    """A ``datasets`` row with a ``messages`` (or ShareGPT ``conversations``) column, as a schema
    sample; media items without a value take theirs, in order, from an ``images`` / ``videos``
    column (:func:`.layouts.normalize_sample`)."""
    sample = normalize_sample(dict(row), where)
    return {"messages": sample["messages"]} if isinstance(sample, dict) and "messages" in sample else sample


def hf_samples(
    name_or_dir: str | Path, split: str = "train", subset: str | None = None, **load_kwargs: Any
) -> Iterator[Sample]:
    """Samples from a ``datasets`` dataset already in the chat schema (a ``messages`` column).
    Relative media paths of a local dataset are resolved against its folder, as a JSON file's
    are against the file's."""
    dataset = load_hf_dataset(name_or_dir, split, subset, **load_kwargs)
    local = Path(name_or_dir)
    base = local.resolve() if local.is_dir() else local.resolve().parent if local.is_file() else None
    root = _MediaRoot(base) if base is not None else None
    for index, row in enumerate(dataset):
        if "messages" not in row and "conversations" not in row:
            raise ValueError(f"{name_or_dir}: no 'messages' (or ShareGPT 'conversations') column "
                             f"(has {', '.join(row)})")
        sample = row_to_sample(row, f"{name_or_dir} row {index}")
        validate_sample(sample, f"{name_or_dir} row {index}")
        yield _resolve_media_paths(sample, root) if root is not None else sample


def _conversation(user: list[dict[str, Any]], answer: str) -> Sample:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# --- makers ----------------------------------------------------------------------------------


def json_to_token(obj: Any, sort_keys: bool = True) -> str:
    """Render a parse tree as Donut's XML-like target: ``<s_key>value</s_key>``.

    Dicts become tagged fields (keys in reverse-sorted order, as Donut's ``json2token`` does, so
    targets match published CORD results), lists are joined with ``<sep/>``, and a dict holding
    only ``text_sequence`` is its plain text.
    """
    if isinstance(obj, dict):
        if len(obj) == 1 and "text_sequence" in obj:
            return str(obj["text_sequence"])
        keys = sorted(obj, reverse=True) if sort_keys else list(obj)
        return "".join(f"<s_{k}>{json_to_token(obj[k], sort_keys)}</s_{k}>" for k in keys)
    if isinstance(obj, list):
        return "<sep/>".join(json_to_token(v, sort_keys) for v in obj)
    return str(obj)


def cord_v2(
    path: str | Path = "naver-clova-ix/cord-v2",
    split: str = "train",
    instruction: str = "Extract the receipt fields.",
    **load_kwargs: Any,
) -> Iterator[Sample]:
    """CORD v2 receipts: ``image`` + ``ground_truth`` JSON; the target is its ``gt_parse`` tree."""
    for index, row in enumerate(load_hf_dataset(path, split, **load_kwargs)):
        truth = json.loads(row["ground_truth"])
        parse = truth["gt_parse"] if "gt_parse" in truth else truth.get("gt_parses", [None])[0]
        if parse is None:
            raise ValueError(f"cord_v2 row {index}: ground_truth has no gt_parse")
        image = {"type": "image", "image": row["image"]}
        yield _conversation([image, {"type": "text", "text": instruction}], json_to_token(parse))


_MEDPIX_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "img", "image_path", "Image"),
    "question": ("question", "Question", "query", "prompt"),
    "answer": ("answer", "Answer", "response"),
}


def _pick_columns(columns: list[str], override: Mapping[str, str] | None, source: str) -> dict[str, str]:
    """Map each role (image/question/answer) to a column: the override, else the first known name."""
    picked: dict[str, str] = {}
    for role, candidates in _MEDPIX_COLUMNS.items():
        wanted = (override or {}).get(role)
        found = wanted if wanted in columns else next((c for c in candidates if c in columns), None)
        if found is None:
            raise ValueError(
                f"{source}: no {role} column ({'asked for ' + repr(wanted) + ', ' if wanted else ''}"
                f"has {', '.join(columns)}); pass columns={{'{role}': NAME}}"
            )
        picked[role] = found
    return picked


def medpix(
    path: str | Path = "mmoukouba/MedPix-VQA",
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    **load_kwargs: Any,
) -> Iterator[Sample]:
    """MedPix VQA: one image, a question and an answer per row.

    ``columns`` maps ``image`` / ``question`` / ``answer`` to column names when they differ from
    the usual ones. A string image is a path, relative to ``path`` when that is a local folder.
    """
    dataset = load_hf_dataset(path, split, **load_kwargs)
    cols = _pick_columns(list(dataset.column_names), columns, f"medpix {path}")
    root = _MediaRoot(Path(path)) if Path(path).is_dir() else None
    for row in dataset:
        image = row[cols["image"]]
        if isinstance(image, str) and root is not None:
            image = _resolve(image, root)
        user = [{"type": "image", "image": image}, {"type": "text", "text": str(row[cols["question"]])}]
        yield _conversation(user, str(row[cols["answer"]]))


def raven(
    path: str | Path = "HuggingFaceM4/the_cauldron",
    split: str = "train",
    subset: str = "raven",
    **load_kwargs: Any,
) -> Iterator[Sample]:
    """the_cauldron/raven: ``images`` plus ``texts`` turns; all images go in the first user turn."""
    for row in load_hf_dataset(path, split, subset, **load_kwargs):
        messages = []
        for turn_index, turn in enumerate(row["texts"]):
            content = (
                [{"type": "image", "image": image} for image in row["images"]] if turn_index == 0 else []
            )
            content.append({"type": "text", "text": turn["user"]})
            messages += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": turn["assistant"]},
            ]
        yield {"messages": messages}


_PLACEHOLDER = re.compile(r"<image>|<video>")


def _place_video(text: str, video: dict[str, Any]) -> list[dict[str, Any]]:
    """Content for the first user turn: the video item where the ``<image>``/``<video>``
    placeholder was (first when there is none), and the text around it without placeholders."""
    parts = _PLACEHOLDER.split(text, maxsplit=1)
    before, after = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    before, after = _PLACEHOLDER.sub("", before).strip(), _PLACEHOLDER.sub("", after).strip()
    items = [{"type": "text", "text": before}] if before else []
    items.append(video)
    return items + ([{"type": "text", "text": after}] if after else [])


def llava_video_178k(
    video_root: str | Path,
    path: str | Path = "lmms-lab/LLaVA-Video-178K",
    split: str = "open_ended",
    subset: str = "0_30_s_nextqa",
    **load_kwargs: Any,
) -> Iterator[Sample]:
    """LLaVA-Video-178K: ``video`` (relative to ``video_root``) and ShareGPT ``conversations``.

    The videos ship as archives next to the annotations; ``video_root`` is where they were
    extracted. The ``<image>``/``<video>`` placeholder is replaced by the video item (put first in
    the first user turn when a row has none).
    """
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    for index, row in enumerate(load_hf_dataset(path, split, subset, **load_kwargs)):
        video = {"type": "video", "video": str(Path(video_root) / row["video"])}
        messages, placed = [], False
        for turn in row["conversations"]:
            if turn["from"] not in role:
                raise ValueError(f"llava_video_178k row {index}: unknown speaker {turn['from']!r}")
            content = [{"type": "text", "text": _PLACEHOLDER.sub("", turn["value"]).strip()}]
            if turn["from"] == "human" and not placed:
                content, placed = _place_video(turn["value"], video), True
            messages.append({"role": role[turn["from"]], "content": content})
        yield {"messages": messages}


MAKERS: dict[str, Callable[..., Iterator[Sample]]] = {
    "cord_v2": cord_v2,
    "medpix": medpix,
    "raven": raven,
    "llava_video_178k": llava_video_178k,
}


def _hf_name_and_split(rest: str) -> tuple[str, str | None]:
    """``NAME_OR_DIR@SPLIT`` -> (NAME_OR_DIR, SPLIT); a folder whose own name holds "@" stays whole."""
    name, at, split = rest.rpartition("@")
    if at and name and split and "/" not in split and not Path(rest).exists():
        return name, split
    return rest, None


def source_path(spec: str) -> str:
    """The file or folder a source spec reads (``jsonl:PATH``, ``json:PATH``, ``hf:DIR[@SPLIT]``);
    anything else is taken as a path."""
    kind, colon, rest = spec.partition(":")
    if colon and rest and kind in ("jsonl", "json"):
        return rest
    if colon and rest and kind == "hf":
        return _hf_name_and_split(rest)[0]
    return spec


def load_source(spec: str, **kwargs: Any) -> Iterator[Sample]:
    """Samples for a source string.

    ``"jsonl:PATH"`` / ``"json:PATH"`` (JSON files), ``"hf:NAME_OR_DIR[@SPLIT]"`` (a ``datasets``
    dataset with a ``messages`` column; the split defaults to train; ``split=``, ``subset=`` as
    keywords), or a maker name
    from :data:`MAKERS`, optionally as ``"NAME:PATH"`` (same as ``path=PATH``); other keywords go
    to the maker.
    """
    kind, colon, rest = spec.partition(":")
    if kind in ("jsonl", "json") and rest:
        if Path(rest).suffix.lower() != f".{kind}":
            raise ValueError(f"source {spec!r}: expected a .{kind} file")
        return load_json_samples(rest)
    if kind == "hf" and rest:
        rest, split = _hf_name_and_split(rest)
        if split is not None:
            kwargs["split"] = split
        return hf_samples(rest, **kwargs)
    if kind in MAKERS:
        if rest:
            kwargs["path"] = rest
        return MAKERS[kind](**kwargs)
    bare = bare_path_source(spec)
    if bare is not None:
        return load_source(bare, **kwargs)
    if Path(spec).expanduser().is_file():
        raise ValueError(f"data source {spec}: not a .jsonl/.json file, a data file datasets reads "
                         f"({', '.join('.' + e for e in DATA_FILE_BUILDERS)}) or a dataset folder")
    if not colon and ("/" in spec or Path(spec).suffix):
        raise ValueError(f"data source {spec}: no such file or folder")
    if not colon:
        raise ValueError(f"data source {spec}: no such file or folder, nor a maker "
                         f"({', '.join(MAKERS)})")
    raise ValueError(
        f"unknown source {spec!r}: use a .jsonl/.json file, a dataset folder or data file, jsonl:PATH, "
        f"json:PATH, hf:NAME_OR_DIR or one of {', '.join(MAKERS)}"
    )


def check_source(spec: str, key: str) -> None:
    """A source spec that names a local file or folder that is not there fails now, by ``key``
    (before a model loads); hub names and makers are checked when they are read."""
    if bare_path_source(spec) is not None:
        return
    named = _named_path(spec)
    if named is not None:
        if not named.exists():
            raise ValueError(f"{key}: data source {spec}: no such file or folder")
        return
    kind, _, rest = spec.partition(":")
    if kind in MAKERS or (kind == "hf" and rest):  # a maker or a hub name: read later
        return
    try:
        load_source(spec)  # not a source: its error names what is accepted
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def _named_path(spec: str) -> Path | None:
    """The local path a prefixed spec names (``jsonl:``/``json:``, ``hf:`` with a local-looking or
    existing path, a maker's local copy), whether or not it exists; None otherwise."""
    kind, _, rest = spec.partition(":")
    if not rest:
        return None
    if kind in ("jsonl", "json") or kind in MAKERS:
        return Path(rest).expanduser()
    if kind == "hf":
        path = Path(_hf_name_and_split(rest)[0]).expanduser()
        return path if rest.startswith(("/", ".", "~")) or path.exists() else None
    return None


def local_source_path(spec: str) -> Path | None:
    """The local file or folder a source spec reads, when it is one that exists."""
    bare = bare_path_source(spec)
    path = _named_path(bare or spec)
    return path if path is not None and path.exists() else None


def refuse_output_over_source(output: str | Path, option: str, spec: str, key: str) -> None:
    """An output must not be a data source, nor hold one, nor sit inside a data folder (the
    dataset would read what is written there on the next run)."""
    from vlm_bridge.convert.hf_io import refuse_output_over_input

    source = local_source_path(spec)
    if source is None:
        return
    refuse_output_over_input(output, {key: source})
    if source.is_dir() and source.resolve() in Path(output).resolve().parents:
        raise ValueError(f"{option} {output} is inside the data folder {key} {spec}, whose next read "
                         "would take what is written there as data; choose an output outside it")


def bare_path_source(spec: str) -> str | None:
    """A source given as a plain path, with its kind: a ``.jsonl``/``.json`` file is read as our
    JSON samples, another data file or a folder (``FOLDER@SPLIT`` for another split than train)
    through ``datasets`` (``hf:``); None when ``spec`` is no existing file or folder."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        return f"{path.suffix[1:].lower()}:{path}"
    if path.is_dir() or (path.is_file() and path.suffix.lower().lstrip(".") in DATA_FILE_BUILDERS):
        return f"hf:{path}"
    name, split = _hf_name_and_split(spec)  # FOLDER@SPLIT, as hf: takes it
    if split is not None and Path(name).expanduser().is_dir():
        return f"hf:{Path(name).expanduser()}@{split}"
    return None
