"""Samples encoded ahead in worker processes: the same steps, data positions and counts as encoding
in the trainer's process, across epochs and skipped samples; an error when the stream reaches it."""

from __future__ import annotations

import os

import pytest
import torch
from test_packing import _FAMILY, _sample, _tags

from vlm_bridge.train.data_stream import MicroBatchStream


class _CountingEncoder:
    """Skips ``None`` samples (counted), fails on negative lengths, counts what it encodes."""

    def __init__(self) -> None:
        self.stats = {"encoded": 0, "no_loss_tokens": 0}

    def encode(self, sample, where: str = "sample"):
        if sample is None:
            self.stats["no_loss_tokens"] += 1
            return None
        if sample[0] < 0:
            raise ValueError(f"{where}: a bad sample")
        if sample[0] == 0:  # the process dies (killed, out of memory)
            os._exit(9)
        self.stats["encoded"] += 1
        return _sample(*sample)


def _stream(samples, workers: int) -> MicroBatchStream:
    stream = MicroBatchStream(samples, _CountingEncoder(), _FAMILY, None, seq_len=64, pack=True,
                              micro_batch_size=1, pad_id=0, seed=3, shuffle=True, pad_to_seq_len=False,
                              row_multiple=16)
    stream.encode_ahead(workers)
    return stream


def _steps(stream: MicroBatchStream, count: int) -> list:
    out = []
    for _ in range(count):
        step = stream.next_step(2)
        out.append(([_tags(mb) for mb in step], [mb.labels.shape[1] for mb in step],
                    (stream.position.epoch, stream.position.index), dict(stream.encoder.stats)))
    return out


def test_workers_give_the_same_steps_positions_and_counts_across_epochs():
    lengths = [40, 30, 24, 34, 5, 50, 9, 17, 61, 3, 28]
    samples = [(n, i + 1) for i, n in enumerate(lengths)] + [None, None]
    here = _stream(samples, 0)
    ahead = _stream(samples, 2)
    try:
        expected = _steps(here, 9)  # about four epochs of 13 samples
        assert expected[-1][2][0] >= 3 and expected[-1][3]["no_loss_tokens"] > 0
        assert _steps(ahead, 9) == expected
        assert ahead.ahead is not None
    finally:
        ahead.close()
    assert ahead.ahead is None
    # resumed mid-run at a saved position: the same steps as the uninterrupted stream
    resumed = _stream(samples, 2)
    try:
        resumed.position.epoch, resumed.position.index = expected[3][2]
        # (counts start afresh on resume, and the sample that ended step 4 is encoded again)
        assert [s[:3] for s in _steps(resumed, 5)] == [s[:3] for s in expected[4:]]
    finally:
        resumed.close()


def bad_fourth_sample_stream() -> MicroBatchStream:
    """Steps of one 40-token row; the fourth sample fails to encode (its step is the second)."""
    samples = [(20, 1), (20, 2), (20, 3), (-1, 4), (20, 5)]
    return MicroBatchStream(samples, _CountingEncoder(), _FAMILY, None, seq_len=40, pack=True,
                            micro_batch_size=1, pad_id=0, seed=0, shuffle=False, pad_to_seq_len=False)


def test_a_bad_sample_fails_the_step_that_reaches_it_not_the_one_that_looks_ahead():
    stream = bad_fourth_sample_stream()
    stream.encode_ahead(2)
    try:
        assert [_tags(mb) for mb in stream.next_step(1)] == [[[1, 2]]]  # the window covers sample 4
        with pytest.raises(ValueError, match="training sample 3: a bad sample"):
            stream.next_step(1)
    finally:
        stream.close()


def test_encoded_tensors_come_back_whole():
    stream = _stream([(33, 7)] * 4, 1)
    try:
        (mb,) = stream.next_step(1)
        assert torch.equal(mb.inputs["input_ids"][0, :33], torch.full((33,), 7))
    finally:
        stream.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_that_no_sample_survives_names_the_counts_and_the_first_reason(workers):
    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.testing.tiny_qwen2_5_vl import make_tiny_processor

    broken = {"messages": [{"role": "user", "content": [{"type": "image", "image": "/no/such.png"},
                                                        {"type": "text", "text": "Q"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}
    encoder = SampleEncoder(make_tiny_processor(), max_seq_len=256, skip_bad_media=True)
    stream = MicroBatchStream([broken] * 3, encoder, _FAMILY, None, seq_len=256, pack=True,
                              micro_batch_size=1, pad_id=0, seed=0, shuffle=False, pad_to_seq_len=False)
    stream.encode_ahead(workers)
    try:
        needle = r"survives encoding \(skipped: \{'bad_media': \d+\}; first: training sample 0: .*such\.png"
        with pytest.raises(ValueError, match=needle):
            stream.next_step(1)
    finally:
        stream.close()


def test_a_worker_that_dies_is_named():
    stream = MicroBatchStream([(20, 1), (0, 2)], _CountingEncoder(), _FAMILY, None, seq_len=20, pack=True,
                              micro_batch_size=1, pad_id=0, seed=0, shuffle=False, pad_to_seq_len=False)
    stream.encode_ahead(1)
    try:
        with pytest.raises(ChildProcessError, match=r"an encoding worker process died \(killed, or out of "
                                               r"memory\?\) while the samples from training sample \d on"):
            stream.next_step(1)
            stream.next_step(1)
    finally:
        stream.close()
