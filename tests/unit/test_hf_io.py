"""Unit tests for vlm_bridge.convert.hf_io (fast, CPU only, tiny tensors)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_bridge.convert.hf_io import (
    CheckpointError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_hf_side_files,
    read_safetensors_header,
)

META = {"format": "pt"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(4, 8, generator=g),
        "b.bf16": torch.randn(16, 3, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(5, generator=g).to(torch.float16),
        "d.i64": torch.randint(-(2**40), 2**40, (3, 2), generator=g),
        "e.scalar": torch.tensor(3.5),
    }


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Hand-write a two-shard checkpoint with index, independent of the writer under test."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2],
              "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / fname, metadata=META)
        weight_map.update(dict.fromkeys(keys, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _assert_same(reader: SafetensorsReader, tensors: dict[str, torch.Tensor]) -> None:
    assert reader.keys() == sorted(tensors)
    for name, ref in tensors.items():
        assert reader.shape(name) == tuple(ref.shape)
        assert reader.dtype(name) == ref.dtype
        got = reader.get(name)
        assert got.dtype == ref.dtype and torch.equal(got, ref), name


def test_single_and_sharded_read_identical(tmp_path: Path) -> None:
    tensors = _tensors()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    save_file(tensors, single / "model.safetensors", metadata=META)
    _write_sharded(sharded, tensors)
    with SafetensorsReader(single) as r1, SafetensorsReader(sharded) as r2:
        _assert_same(r1, tensors)
        _assert_same(r2, tensors)
        assert r1.total_bytes() == r2.total_bytes() == sum(t.nbytes for t in tensors.values())
        assert "a.f32" in r2 and "nope" not in r2


def test_fallback_glob_and_lazy_get(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({"a.f32": tensors["a.f32"]}, tmp_path / "part1.safetensors")
    save_file({"d.i64": tensors["d.i64"]}, tmp_path / "part2.safetensors")
    reader = SafetensorsReader(tmp_path)
    assert torch.equal(reader.get("d.i64"), tensors["d.i64"])
    assert len(reader._handles) == 1  # only the file holding the tensor was opened
    reader.get("d.i64").add_(1)  # in-place edits must not leak into later reads
    assert torch.equal(reader.get("d.i64"), tensors["d.i64"])
    with pytest.raises(CheckpointError, match=r"missing\.weight"):
        reader.get("missing.weight")
    with pytest.raises(CheckpointError, match=r"missing\.weight"):
        reader.shape("missing.weight")
    reader.close()


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'w'.*a\.safetensors.*b\.safetensors"):
        SafetensorsReader(tmp_path)


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        SafetensorsReader(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"v": torch.zeros(2)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model-00001-of-00002\.bin, "
                                              r"\.\.\.\), which are not read; write safetensors first"):
        SafetensorsReader(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path, metadata=META)
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(CheckpointError, match="truncated") as info:
        SafetensorsReader(tmp_path)
    msg = str(info.value)
    assert "model.safetensors" in msg and str(size) in msg and str(size - 10) in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [
        (b"abc", "truncated"),  # shorter than the 8-byte length prefix
        (struct.pack("<Q", 10**6) + b"{}", "header length"),  # length beyond file end
        (struct.pack("<Q", 8) + b"not json" + b"\0" * 16, "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (b"\xff" * 64, "header length"),  # random garbage
    ],
)
def test_garbage_header(tmp_path: Path, payload: bytes, pattern: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=pattern) as info:
        SafetensorsReader(tmp_path)
    assert "model.safetensors" in str(info.value)


def test_header_offsets_inconsistent_with_shape(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"'w'.*expected 16"):
        read_safetensors_header(path)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        SafetensorsReader(tmp_path)


def test_index_names_tensor_not_in_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"ghost\.weight.*model-00001-of-00002"):
        SafetensorsReader(tmp_path)


def test_writer_multiple_shards_roundtrip(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=100)
    for name, t in tensors.items():
        writer.add(name, t)
    with pytest.raises(ValueError, match="twice"):
        writer.add("a.f32", tensors["a.f32"])
    weight_map = writer.finalize()
    files = sorted(p.name for p in tmp_path.iterdir())
    n = len(files) - 1
    assert n >= 3
    assert files == [
        *(f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)),
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    with SafetensorsReader(tmp_path) as reader:
        _assert_same(reader, tensors)
    # Every shard must be loadable by plain safetensors and carry transformers' metadata.
    loaded: dict[str, torch.Tensor] = {}
    for fname in set(weight_map.values()):
        loaded.update(load_file(tmp_path / fname))
        assert read_safetensors_header(tmp_path / fname)["__metadata__"] == META
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_writer_single_shard(tmp_path: Path) -> None:
    tensors = _tensors()
    base = torch.arange(12, dtype=torch.float32)
    tensors["tied.a"] = base
    tensors["tied.b"] = base  # same storage: must be cloned, not rejected by save_file
    tensors["slice"] = base.view(3, 4)[:, 1]  # non-contiguous view
    writer = ShardedSafetensorsWriter(tmp_path)
    for name, t in tensors.items():
        writer.add(name, t)
    weight_map = writer.finalize()
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert set(weight_map.values()) == {"model.safetensors"}
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with SafetensorsReader(tmp_path) as reader:
        _assert_same(reader, tensors)
    with pytest.raises(CheckpointError, match="already has weight files"):
        ShardedSafetensorsWriter(tmp_path)
    # a small file carries a header of its own size, not the 1 MiB reserved while writing
    data = sum(t.nbytes for t in tensors.values())
    header = read_safetensors_header(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").stat().st_size < 8 + len(json.dumps(header)) + 8 + data


def test_writer_keeps_the_reserve_for_large_shards(tmp_path: Path, monkeypatch) -> None:
    """A shard past COMPACT_BELOW keeps its reserved header space (no second pass over it)."""
    monkeypatch.setattr(ShardedSafetensorsWriter, "COMPACT_BELOW", 64)
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finalize()
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size == ShardedSafetensorsWriter.HEADER_RESERVE + sum(t.nbytes for t in tensors.values())
    with SafetensorsReader(tmp_path) as reader:
        _assert_same(reader, tensors)


def test_writer_output_loads_with_transformers(tmp_path: Path) -> None:
    """from_pretrained must accept our shard names, index and metadata (tiny Llama)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=8192)
    for name, t in model.state_dict().items():
        writer.add(name, t)
    writer.finalize()
    cfg.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_atomic_existing_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    entered = False
    with (
        pytest.raises(CheckpointError, match="already exists; pass --overwrite"),
        atomic_output_dir(target),
    ):
        entered = True
    assert not entered
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (target / "keep.txt").read_text() == "old"


def test_atomic_exception_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_success_and_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        (tmp / "first.txt").write_text("1")
        (tmp / "model-00001-of-00002.safetensors").write_bytes(b"old")
        (tmp / "model.safetensors.index.json").write_text("{}")
        assert not target.exists()
    (target / "README.md").write_text("model card")  # a cloned hub repository's own files
    (target / ".git").mkdir()
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "first.txt").write_text("new")
        (tmp / "model.safetensors").write_bytes(b"new")
        assert (target / "model.safetensors.index.json").exists()  # old contents untouched until success
    # what the new output writes replaces the old, old weights and indexes go, the rest stays
    assert sorted(os.listdir(target)) == [".git", "README.md", "first.txt", "model.safetensors"]
    assert (target / "first.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]  # no temp or moved-aside folders left
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask


def test_atomic_overwrite_undoes_its_moves_on_a_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out"
    target.mkdir()
    for name in ("a.txt", "b.txt", "old.safetensors", "README.md"):
        (target / name).write_text(f"old {name}")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(Path(dst))
        if Path(dst) == target / "b.txt" and calls.count(Path(dst)) == 1:  # the new b.txt fails to move in
            raise OSError("disk full")
        return real_replace(src, dst)

    with pytest.raises(OSError, match="disk full"), atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new a")
        (tmp / "b.txt").write_text("new b")
        monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        n: f"old {n}" for n in ("a.txt", "b.txt", "old.safetensors", "README.md")}
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_output_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    real, link, dangling = tmp_path / "disk" / "real", tmp_path / "link", tmp_path / "later"
    real.mkdir(parents=True)
    link.symlink_to(real)
    with atomic_output_dir(link, overwrite=True) as tmp:
        (tmp / "x.txt").write_text("1")
    assert link.is_symlink() and (real / "x.txt").read_text() == "1"
    dangling.symlink_to(tmp_path / "disk" / "not_yet")
    with atomic_output_dir(dangling) as tmp:  # no "already exists": the target does not
        (tmp / "y.txt").write_text("2")
    assert dangling.is_symlink() and (tmp_path / "disk" / "not_yet" / "y.txt").read_text() == "2"


def test_copy_hf_side_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    keep = ["added_tokens.json", "chat_template.jinja", "config.json", "configuration_x.py",
            "generation_config.json", "merges.txt", "preprocessor_config.json",
            "processor_config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json", "video_preprocessor_config.json",
            "vocab.json"]
    drop = ["model.safetensors", "model-00001-of-00002.safetensors",
            "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "training_args.pt", "optim.pth", ".gitattributes"]
    for name in keep + drop:
        (src / name).write_text(name)
    (src / "subdir").mkdir()
    blob = tmp_path / "blob"
    blob.write_text("linked")
    (src / "linked_config.json").symlink_to(blob)  # HF cache snapshots are symlinks
    copied = copy_hf_side_files(src, dst)
    assert copied == sorted([*keep, "linked_config.json"])
    assert sorted(os.listdir(dst)) == copied
    assert not (dst / "linked_config.json").is_symlink()
    assert (dst / "linked_config.json").read_text() == "linked"
    assert (dst / "config.json").read_text() == "config.json"


def test_write_behind_keeps_order_bounds_its_queue_and_raises_a_failed_write(tmp_path):
    import threading

    from vlm_bridge.convert.write_behind import WriteBehind

    class SlowFile:  # records the bytes and how many were queued when each write started
        def __init__(self):
            self.chunks, self.gate = [], threading.Event()

        def write(self, data):
            self.gate.wait(5)
            self.chunks.append(bytes(data))

    writes = WriteBehind(limit=64)
    out = SlowFile()
    tensors = [torch.full((8,), float(i)) for i in range(6)]  # 32 bytes each
    writer = threading.Thread(target=lambda: [writes.write(out, t) for t in tensors])
    writer.start()
    writer.join(0.5)
    assert writer.is_alive() and writes._queued <= 64  # blocked: two tensors fill the queue
    out.gate.set()
    writer.join(5)
    writes.wait()
    assert b"".join(out.chunks) == b"".join(t.numpy().tobytes() for t in tensors)

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

    writes.write(FullDisk(), tensors[0])
    with pytest.raises(OSError, match="No space left"):
        writes.wait()
    writes.close()
