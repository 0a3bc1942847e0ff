"""Lazy, validated reading and sharded, atomic writing of Hugging Face safetensors folders.

Checkpoints are tens of GB: the reader loads one tensor at a time and validates all
headers up front, so a truncated download or stale index fails in one readable line
before hours of work. The writer emits the layout `from_pretrained` expects, and
`atomic_output_dir` keeps a crashed run from leaving a plausible-looking half checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch
from safetensors import safe_open

from vlm_bridge.convert.write_behind import WriteBehind

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The safetensors library itself refuses headers above 100 MB; a larger length means garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Weight files (ours or other frameworks') that must not leak into a converted folder.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json",
                    ".pt", ".pth", ".msgpack", ".h5", ".gguf")

# Header dtype strings <-> torch dtypes; getattr because newer types depend on the torch build.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_DTYPES = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CheckpointError(ValueError):
    """A user-facing, one-line error about checkpoint files (names the file/tensor/shape).

    A ValueError subclass so CLIs can print it without a traceback.
    """


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """Parse and check one file's JSON header (``__metadata__`` included); reads no data.

    Truncation is caught here because safetensors' own error for it is an opaque
    message that appears only when the missing tensor is finally read.
    """
    file = Path(file)
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, need at least 8)")
    with file.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file: header length "
                                  f"{n} bytes but file has only {size} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}") from None
        if not 0 <= begin <= end or min(shape, default=0) < 0:
            raise CheckpointError(f"{file}: tensor {name!r} has invalid offsets {[begin, end]} "
                                  f"or shape {shape}")
        if dtype in _DTYPES:
            want = math.prod(shape) * _DTYPES[dtype].itemsize
            if end - begin != want:
                raise CheckpointError(f"{file}: tensor {name!r} ({dtype}, shape {shape}) spans "
                                      f"{end - begin} bytes, expected {want}")
        data_end = max(data_end, end)
    expected = 8 + n + data_end
    if size < expected:
        raise CheckpointError(f"{file}: truncated safetensors file: expected at least {expected} "
                              f"bytes, got {size}")
    return header


class SafetensorsReader:
    """Lazy reader over an HF model folder.

    Layouts, in the order transformers tries them: ``model.safetensors``; else
    ``model.safetensors.index.json`` plus its shards; else (fallback for hand-made
    folders) every ``*.safetensors`` file. All headers are validated in ``__init__``
    so errors surface before any conversion work; tensor data is read only by `get`,
    one tensor at a time, so peak memory is the largest single tensor.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        index_path = self.folder / INDEX_FILE
        index: dict[str, str] | None = None
        if (self.folder / SINGLE_FILE).is_file():
            files = [self.folder / SINGLE_FILE]
        elif index_path.is_file():
            try:
                index = dict(json.loads(index_path.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid index ({exc!r})") from None
            files = [self.folder / f for f in sorted(set(index.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index_path} lists shard {f.name} which does not exist")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.folder.glob("*.bin"))
            if pickled:  # read by unpickling (code may run) and whole: converted once by transformers instead
                raise CheckpointError(
                    f"no *.safetensors files in {self.folder}, only pickled weights ({pickled[0]}"
                    f"{', ...' if len(pickled) > 1 else ''}), which are not read; write safetensors first: "
                    f"AutoModelForImageTextToText.from_pretrained(DIR).save_pretrained(NEW_DIR)")
            raise CheckpointError(f"no *.safetensors files in {self.folder}")

        self._entries: dict[str, tuple[Path, dict[str, Any]]] = {}
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name == "__metadata__":
                    continue
                if name in self._entries:
                    raise CheckpointError(f"tensor {name!r} appears in both "
                                          f"{self._entries[name][0].name} and {f.name}")
                self._entries[name] = (f, info)
        for name, fname in (index or {}).items():
            if name not in self._entries or self._entries[name][0].name != fname:
                raise CheckpointError(f"{index_path} maps tensor {name!r} to {fname}, "
                                      f"but {fname} does not contain it")
        self._handles: dict[Path, Any] = {}
        self._data_starts: dict[Path, int] = {}

    def keys(self) -> list[str]:
        """All tensor names, sorted so conversions iterate deterministically."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[Path, dict[str, Any]]:
        try:
            return self._entries[name]
        except KeyError:
            msg = f"tensor {name!r} not found in checkpoint {self.folder}"
            raise CheckpointError(msg) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header; no tensor data is read."""
        return tuple(int(d) for d in self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """Dtype from the header; no tensor data is read."""
        file, info = self._entry(name)
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {info['dtype']} "
                                  f"that this torch build cannot represent")
        return _DTYPES[info["dtype"]]

    def span(self, name: str) -> tuple[Path, int, int]:
        """(file, byte offset, length) of this tensor's data; reads only the header length."""
        file, info = self._entry(name)
        if file not in self._data_starts:
            with file.open("rb") as fh:
                self._data_starts[file] = 8 + struct.unpack("<Q", fh.read(8))[0]
        begin, end = (int(x) for x in info["data_offsets"])
        return file, self._data_starts[file] + begin, end - begin

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        """Read just this tensor into an owned CPU tensor; handles are opened lazily.

        Cloned by default because safe_open hands out views of one copy-on-write mmap per handle:
        an in-place edit (e.g. ``mul_``) would silently show up in later reads. ``copy=False``
        returns that view (its storage is exactly the tensor's bytes, paged in as it is read) for
        callers that only read it, such as a conversion whose ops are all out of place.
        """
        file, _ = self._entry(name)
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        view = self._handles[file].get_tensor(name)
        return view.clone() if copy else view

    def total_bytes(self) -> int:
        """Sum of tensor payload sizes, e.g. for progress bars and the output index."""
        return sum(end - begin for _, info in self._entries.values()
                   for begin, end in [info["data_offsets"]])

    def close(self) -> None:
        """Drop the mmap-backed handles (matters on Windows and for deleting the folder)."""
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Streams tensors into HF-style shards so a conversion never holds the whole model.

    Each tensor's bytes go to the open shard file as soon as it is added (nothing is buffered);
    the shard's header is written into space reserved at the start of the file when the shard is
    closed (padded with spaces, which the safetensors format allows; a small shard is rewritten
    with a header of its own size instead). A shard closes when the
    next tensor would pass ``max_shard_bytes`` (a bigger tensor gets a shard of its own) or its
    header would outgrow the reserved space. Shards get temporary names because the final
    ``model-0000i-of-0000N.safetensors`` needs N; :meth:`finalize` renames them (one shard:
    ``model.safetensors``, no index), as transformers does. Files carry metadata
    ``{"format": "pt"}``, which transformers checks.
    """

    HEADER_RESERVE = 1024 * 1024  # bytes; a multiple of 8 keeps the data 8-byte aligned
    # A shard with less data than this is rewritten with a header of its own size on closing: the
    # reserve would otherwise make a small model's file 1 MiB larger (a 2 GB shard: 0.05%).
    COMPACT_BELOW = 64 * 1024 * 1024

    def __init__(self, folder: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.folder.glob("*.safetensors*"))
        if stale:  # mixing with an earlier run's shards would silently corrupt the checkpoint
            raise CheckpointError(f"output folder {self.folder} already has weight files: {stale}")
        self.max_shard_bytes = max_shard_bytes
        self._file = None
        self._entries: dict[str, dict] = {}
        self._data_bytes = 0
        self._header_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total = 0
        self._finalized = False
        self._writes = WriteBehind()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor into the open shard (opening or closing shards as needed); duplicate
        names raise ValueError. The bytes are written on a background thread (``write_behind``):
        the tensor must not be modified afterwards."""
        if self._finalized:
            raise ValueError("ShardedSafetensorsWriter.add() called after finalize()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        t = tensor.detach().to("cpu").contiguous()
        entry = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape)}
        entry_bytes = len(json.dumps({name: {**entry, "data_offsets": [2**62, 2**62]}}))
        if self._file is not None and self._entries and (
                self._data_bytes + t.nbytes > self.max_shard_bytes
                or self._header_bytes + entry_bytes > self.HEADER_RESERVE - 256):
            self._close_shard()
        if self._file is None:
            path = self.folder / f".shard-{len(self._shards) + 1:05d}.tmp"
            self._file = open(path, "wb")  # noqa: SIM115 - closed in _close_shard
            self._file.seek(self.HEADER_RESERVE)
            self._shards.append((path, []))
        if t.nbytes:
            self._writes.write(self._file, t)
        self._entries[name] = {**entry, "data_offsets": [self._data_bytes, self._data_bytes + t.nbytes]}
        self._data_bytes += t.nbytes
        self._header_bytes += entry_bytes
        self._shards[-1][1].append(name)
        self._names.add(name)
        self._total += t.nbytes

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":"))
        room = self.HEADER_RESERVE - 8
        if len(header) > room:
            raise AssertionError(f"safetensors header of {len(header)} bytes outgrew its {room}")
        self._writes.wait()
        if self._data_bytes < self.COMPACT_BELOW:
            self._file.close()
            with open(self._shards[-1][0], "r+b") as f:
                f.seek(self.HEADER_RESERVE)
                data = f.read()
                fitted = header.encode().ljust(-(-len(header) // 8) * 8, b" ")  # data stays 8-aligned
                f.seek(0)
                f.write(struct.pack("<Q", len(fitted)) + fitted + data)
                f.truncate()
        else:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", room) + header.encode().ljust(room, b" "))
            self._file.close()
        self._file, self._entries, self._data_bytes, self._header_bytes = None, {}, 0, 0

    def finalize(self) -> dict[str, str]:
        """Write the last shard, rename shards to final names, write the index if >1 shard."""
        if self._finalized:
            raise ValueError("ShardedSafetensorsWriter.finalize() called twice")
        if not self._names:
            raise ValueError(f"no tensors were added to {self.folder}")
        if self._file is not None:
            self._close_shard()
        self._writes.close()
        self._finalized = True
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        weight_map = dict(sorted(weight_map.items()))
        if n > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


def refuse_output_over_input(output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """A command's output must not be one of its inputs, nor a folder holding one: writing it (and
    with --overwrite, deleting what was there) would destroy the input; nor an existing file inside
    an input folder (a checkpoint's own metadata, say). ``inputs``: option name -> path given (None:
    not given)."""
    out = Path(output).resolve()
    for option, given in inputs.items():
        if given is None:
            continue
        src = Path(given).resolve()
        if src == out or out in src.parents:
            raise CheckpointError(f"the output {output} is {'' if src == out else 'a folder holding '}"
                                  f"the input {option} {given}; choose another output path")
        if src.is_dir() and src in out.parents and os.path.lexists(out) and not out.is_dir():
            raise CheckpointError(f"the output {output} is a file of the input {option} {given}; choose "
                                  "another output path")


def refuse_existing_file(path: str | Path, option: str, overwrite: bool) -> None:
    """An output file that exists is replaced only with ``--overwrite``."""
    if os.path.lexists(Path(path).resolve()) and not overwrite:
        raise CheckpointError(f"{option} {path} already exists; pass --overwrite to replace it")


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that strict parsers read: a non-finite number (a metric's nan, say) is written as null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file by a temporary sibling and a rename (a failed run leaves no half-written
    file); missing parent folders are created. A symlinked path is written where it points."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# What a new conversion output supersedes in an existing folder even when it does not write a file
# of that name: weights of any format and their indexes (stale shards would load with new ones).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".index.json", ".ckpt", ".h5",
                   ".msgpack")


# Files that describe superseded weights (an HF-PEFT adapter's config without its weights would
# make transformers load an adapter that is gone).
WEIGHT_COMPANIONS = ("adapter_config.json",)


def _superseded(name: str, written: set[str]) -> bool:
    return name in written or name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_COMPANIONS


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder whose contents become `path` only if the block succeeds.

    The sibling (``.<name>.tmp-<random>``) is on the same filesystem, so ``os.replace`` is an
    atomic rename: a new `path` appears complete or not at all. With ``overwrite`` an existing
    folder keeps its identity and whatever the new output does not supersede (a README, ``.git``
    of a cloned model repository): the entries the new output writes, and every weight file and
    index, are moved aside, the new entries moved in, and the old ones deleted; on a failure the
    moves are undone. On exception the temporary folder is deleted. The existence check runs before
    any work, so a forgotten ``--overwrite`` costs nothing. A symlinked `path` is written where it
    points (a dangling link: its target is created). No fsync: not power-loss durable.

    Multi-process use: exactly one process (e.g. rank 0) enters this context; it
    passes the yielded path to the others (e.g. broadcast), they write inside it, and
    all must have finished (barrier) before that process leaves the block.
    """
    given, path = Path(path), Path(path).resolve()
    exists_msg = f"output directory {given} already exists; pass --overwrite to replace it"
    if os.path.lexists(path) and not overwrite:
        raise CheckpointError(exists_msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # not tempfile.mkdtemp: that makes the final folder mode 0700, not umask's
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            tmp.mkdir()
            break
    try:
        yield tmp
        if not os.path.lexists(path):
            os.replace(tmp, path)
            return
        if not overwrite:  # someone else created it while we were working
            raise CheckpointError(exists_msg)
        if path.is_dir():
            _move_contents_in(tmp, path)
            tmp.rmdir()
            return
        old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_contents_in(new: Path, folder: Path) -> None:
    """Replace what ``new`` supersedes in ``folder`` by ``new``'s entries; undone on a failure."""
    written = {entry.name for entry in new.iterdir()}
    aside = folder.parent / f".{folder.name}.old-{secrets.token_hex(4)}"
    aside.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in sorted(folder.iterdir()):
            if _superseded(entry.name, written):
                os.replace(entry, aside / entry.name)
                moved_out.append(entry.name)
        for name in sorted(written):
            os.replace(new / name, folder / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            os.replace(folder / name, new / name)
        for name in moved_out:
            os.replace(aside / name, folder / name)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def copy_hf_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every top-level non-weight file of an HF folder; return the sorted names copied.

    Config, tokenizer, processor, chat template and remote code must all come along;
    excluding weights is robust to the next model's new file, unlike an allow-list.
    Symlinks are followed (HF-cache snapshots are symlinks into blobs/). Hidden files
    (.gitattributes, .cache/) are skipped: they are repo plumbing.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied
