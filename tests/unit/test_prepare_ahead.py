"""A step built ahead (in a thread while the current one trains) is the step built when asked:
the same batches, and while it waits, the data position and counts of the steps handed out."""

from __future__ import annotations

import threading
import time

import pytest
from test_encode_ahead import _CountingEncoder, _stream, bad_fourth_sample_stream
from test_packing import _FAMILY, _tags

from vlm_bridge.train.data_stream import MicroBatchStream

LENGTHS = [40, 30, 24, 34, 5, 50, 9, 17, 61, 3, 28]
SAMPLES = [(n, i + 1) for i, n in enumerate(LENGTHS)] + [None, None]


def _view(step) -> tuple:
    return [_tags(mb) for mb in step], [mb.labels.shape[1] for mb in step]


def _on_demand(count: int) -> list:
    stream = _stream(SAMPLES, 0)
    out = []
    for _ in range(count):
        step = _view(stream.next_step(2))
        out.append((step, (stream.position.epoch, stream.position.index), stream.counts()))
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("inline", [False, True])
def test_steps_built_ahead_are_the_steps_built_when_asked(workers, inline, monkeypatch):
    if inline:
        monkeypatch.setenv("VLM_BRIDGE_PREPARE_AHEAD", "0")
    expected = _on_demand(9)  # about four epochs of 13 samples, two of them skipped
    stream = _stream(SAMPLES, workers)
    try:
        got = []
        for i in range(9):
            step = _view(stream.next_step(2))
            if i < 8:  # the next step is built while this one "trains"
                stream.prepare_next(2)
            # a checkpoint and the final report take the handed-out steps' position and counts
            position = stream.resume_position
            got.append((step, (position.epoch, position.index), stream.counts()))
        assert got == expected
    finally:
        stream.close()


def test_a_bad_sample_in_the_step_built_ahead_fails_when_that_step_is_asked_for():
    stream = bad_fourth_sample_stream()
    try:
        assert [_tags(mb) for mb in stream.next_step(1)] == [[[1, 2]]]
        stream.prepare_next(1)  # reaches the bad sample, in its thread: nothing raised here
        time.sleep(0.05)
        assert (stream.resume_position.epoch, stream.resume_position.index) == (0, 2)
        with pytest.raises(ValueError, match="training sample 3: a bad sample"):
            stream.next_step(1)
    finally:
        stream.close()


class _SlowEncoder(_CountingEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def encode(self, sample, where: str = "sample"):
        self.started.set()
        time.sleep(0.2)
        return super().encode(sample, where)


def test_closing_stops_a_step_being_built_at_its_next_sample():
    encoder = _SlowEncoder()
    stream = MicroBatchStream([(10, i) for i in range(1, 200)], encoder, _FAMILY, None, seq_len=400,
                              pack=True, micro_batch_size=1, pad_id=0, seed=0, shuffle=False,
                              pad_to_seq_len=False)
    stream.prepare_next(4)  # 4 rows of 40 samples: 32 s of encoding
    assert encoder.started.wait(5)
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 5.0  # not the 32 s that building the step takes
    assert not any(t.name == "vlm-bridge-next-step" for t in threading.enumerate())


def test_a_prepared_step_is_asked_for_at_its_size():
    stream = _stream(SAMPLES, 0)
    try:
        stream.prepare_next(2)
        with pytest.raises(RuntimeError, match="2 micro-batches was prepared, 3 were asked for"):
            stream.next_step(3)
    finally:
        stream.close()
