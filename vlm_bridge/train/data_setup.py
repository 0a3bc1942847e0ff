"""Data for a run: source -> HF-processor encoder -> deterministic micro-batch stream."""

from __future__ import annotations

from vlm_bridge.train.config import TrainConfig
from vlm_bridge.train.data_stream import MicroBatchStream


def build_stream(cfg: TrainConfig, built) -> MicroBatchStream:
    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.data.sources import load_source
    from vlm_bridge.loading import load_processor

    if not cfg.data.train:
        raise ValueError("no training data given (data.train=PATH of a .jsonl/.json file or a dataset, "
                         "jsonl:PATH, hf:NAME_OR_DIR, or a maker name)")
    processor = load_processor(built.hf_side_dir)
    samples = load_source(cfg.data.train)
    if not hasattr(samples, "__getitem__"):
        samples = list(samples)
    if cfg.data.max_samples is not None:
        samples = samples[: cfg.data.max_samples]
    encoder = SampleEncoder(processor, cfg.data.seq_len, skip_bad_media=cfg.data.skip_bad_media,
                            bad_media_hint="; data.skip_bad_media=true skips such samples (and counts them)")
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    stream = MicroBatchStream(
        samples, encoder, built.family, built.settings, seq_len=cfg.data.seq_len,
        pack=cfg.data.pack, micro_batch_size=cfg.micro_batch_size, pad_id=pad_id,
        seed=cfg.seed, shuffle=cfg.data.shuffle, pad_to_seq_len=cfg.parallel.pp > 1,
        row_multiple=cfg.data.row_multiple,
    )
    from vlm_bridge.train.encode_ahead import auto_workers

    stream.encode_ahead(auto_workers() if cfg.data.workers < 0 else cfg.data.workers)
    return stream
