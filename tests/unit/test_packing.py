"""Packing samples into rows: best-fit placement, every sample exactly once, rows within seq_len,
micro-batches that end after their longest row (not at seq_len), and a resume position that still
names one contiguous run of the data order."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from vlm_bridge.data.encode import EncodedSample
from vlm_bridge.train.batching import BestFitRows, pack_best_fit, row_length
from vlm_bridge.train.data_stream import MicroBatchStream

# Token counts of the sample-step benchmark's 24 mixed-image samples (Qwen2.5-VL processor).
BENCHMARK_LENGTHS = [1221, 522, 598, 942, 594, 893, 963, 383, 350, 1203, 969, 771, 619, 1182, 564,
                     1221, 658, 966, 849, 639, 1048, 808, 1002, 766]


def _in_order_rows(lengths: list[int], seq_len: int) -> int:
    """Rows used when each row is closed at the first sample that overflows it."""
    rows, used = 0, seq_len + 1
    for n in lengths:
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows


def _check_partition(rows: list[list[int]], lengths: list[int], seq_len: int) -> None:
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
    assert all(row == sorted(row) for row in rows)


def test_best_fit_fills_the_benchmark_batch_into_five_rows():
    rows = pack_best_fit(BENCHMARK_LENGTHS, 4096)
    _check_partition(rows, BENCHMARK_LENGTHS, 4096)
    fill = [sum(BENCHMARK_LENGTHS[i] for i in row) for row in rows]
    assert len(rows) == 5 and _in_order_rows(BENCHMARK_LENGTHS, 4096) == 6
    assert fill == sorted(fill, reverse=True)  # fullest first


@pytest.mark.parametrize("seed", range(20))
def test_best_fit_partitions_random_lengths_into_no_more_rows_than_in_order(seed):
    rng = random.Random(seed)
    seq_len = rng.choice([64, 300, 4096])
    lengths = [rng.randint(1, seq_len) for _ in range(rng.randint(1, 60))]
    rows = pack_best_fit(lengths, seq_len)
    _check_partition(rows, lengths, seq_len)
    assert len(rows) <= _in_order_rows(lengths, seq_len)
    assert len(rows) >= -(-sum(lengths) // seq_len)


def test_a_bounded_packer_refuses_without_changing_and_repacks_when_that_fits():
    packer = BestFitRows(10, max_rows=2)
    for n in (2, 5, 5):  # as they come: [2, 5] [5]; then 8 fits in neither row
        assert packer.add(n)
    assert packer.add(8)  # longest first holds all four: [8, 2] [5, 5]
    assert sorted(sorted(packer.lengths[i] for i in row) for row in packer.rows) == [[2, 8], [5, 5]]
    before = [list(r) for r in packer.rows]
    assert not packer.add(1)
    assert packer.rows == before and len(packer.lengths) == 4
    with pytest.raises(ValueError, match="does not fit seq_len 10"):
        packer.add(11)


def _sample(n: int, tag: int) -> EncodedSample:
    ids = torch.full((n,), tag)
    return EncodedSample(input_ids=ids, labels=ids.clone(), num_loss_tokens=n)


class _Encoder:
    def encode(self, sample, where: str = "sample"):
        return None if sample is None else _sample(*sample)


_FAMILY = SimpleNamespace(
    token_keys=(), media_keys=(),
    position_ids=lambda settings, batch: torch.arange(batch["input_ids"].shape[1])[None])


def _stream(samples, **kwargs) -> MicroBatchStream:
    options = {"seq_len": 64, "pack": True, "micro_batch_size": 1, "pad_id": 0, "seed": 0,
               "shuffle": False, "pad_to_seq_len": False, "row_multiple": 16} | kwargs
    return MicroBatchStream(samples, _Encoder(), _FAMILY, None, **options)


def _tags(mb) -> list[list[int]]:
    """The samples of each row, as the tags their tokens carry."""
    out = []
    for ids, seg in zip(mb.inputs["input_ids"], mb.inputs["attention_mask"].segment_ids):
        out.append([int(ids[seg == j][0]) for j in range(int(seg.max()) + 1)])
    return out


def test_stream_steps_consume_contiguous_runs_in_best_fit_rows_that_end_after_the_last_sample():
    lengths = [40, 30, 24, 34, 5, 50, 9]
    stream = _stream([(n, i + 1) for i, n in enumerate(lengths)] * 2)  # tags 1..7, twice
    # In arrival order [40] [30, 24] would end the step at the fourth sample; best fit puts 24
    # with 40 and 34 with 30. The fifth fits in neither row: it opens the next step.
    first = stream.next_step(2)
    assert [_tags(mb) for mb in first] == [[[1, 3]], [[2, 4]]]
    assert [mb.labels.shape[1] for mb in first] == [64, 64]
    assert stream.position.index == 4
    second = stream.next_step(2)
    assert [_tags(mb) for mb in second] == [[[5, 6, 7]], [[1]]]  # the order wraps into epoch 2
    assert [mb.labels.shape[1] for mb in second] == [64, 48]  # 40 tokens end at 48, not 64
    assert [mb.num_tokens for mb in second] == [64, 40]
    assert (stream.position.epoch, stream.position.index) == (0, 8)


def test_stream_rows_keep_seq_len_under_pipeline_parallelism_or_row_multiple_zero():
    samples = [(n, 1) for n in (20, 7, 33)]
    for kwargs in ({"pad_to_seq_len": True}, {"row_multiple": 0}):
        step = _stream(samples, **kwargs).next_step(1)
        assert [mb.labels.shape[1] for mb in step] == [64]
    with pytest.raises(ValueError, match="data.row_multiple must be >= 0"):
        _stream(samples, row_multiple=-1)


def test_row_length_rounds_the_longest_row_and_caps_at_seq_len():
    rows = [[_sample(30, 1)], [_sample(50, 2), _sample(3, 3)]]
    assert row_length(rows, 64, 16) == 64 and row_length(rows, 100, 16) == 64
    assert row_length(rows, 100, 0) == 100 and row_length([[]], 100, 16) == 16


def test_rows_keep_media_kinds_apart_when_asked():
    """Images and videos never share a row (text-only samples go anywhere), also once the step
    re-packs longest first."""
    rng = random.Random(0)
    for trial in range(200):
        lengths = [rng.randint(50, 900) for _ in range(rng.randint(2, 30))]
        kinds = [rng.choice(["image", "video", None]) for _ in lengths]
        packer = BestFitRows(1024, max_rows=rng.randint(2, 12))
        placed = 0
        for n, kind in zip(lengths, kinds):
            if not packer.add(n, kind):
                break
            placed += 1
        rows = packer.ordered()
        assert sorted(i for row in rows for i in row) == list(range(placed)), trial
        for row in rows:
            assert sum(lengths[i] for i in row) <= 1024
            assert len({kinds[i] for i in row} - {None}) <= 1, (trial, [kinds[i] for i in row])
    one_row = BestFitRows(1024, max_rows=1)
    assert one_row.add(100, "image") and one_row.add(100, None) and not one_row.add(100, "video")
    assert one_row.rows == [[0, 1]]


def test_micro_batches_end_where_images_give_way_to_videos():
    from vlm_bridge.train.batching import group_rows

    def row(kind: str | None) -> list:
        media = {"image": {"pixel_values": torch.zeros(1)}, "video": {"pixel_values_videos": torch.zeros(1)}}
        ids = torch.ones(4, dtype=torch.long)
        return [EncodedSample(input_ids=ids, labels=ids.clone(), num_loss_tokens=4,
                              media=media.get(kind, {}))]

    rows = [row("video"), row("image"), row(None), row("image"), row("video")]
    groups = group_rows(rows, 2, video_alone=True)
    kinds = [{("v" if "pixel_values_videos" in r[0].media else "i" if r[0].media else "t") for r in g}
             for g in groups]
    assert sum(len(g) for g in groups) == 5 and all(len(g) <= 2 for g in groups)
    assert all(not {"i", "v"} <= k for k in kinds), kinds
    assert len(group_rows(rows, 2, video_alone=False)) == 3  # other families: fixed groups, any mix
    with pytest.raises(ValueError, match="set micro_batch_size=1"):
        group_rows(rows, 4, video_alone=True, fixed=True)  # pipeline stages: full micro-batches only
