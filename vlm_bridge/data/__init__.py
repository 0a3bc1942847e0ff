"""Fine-tuning data layer: one chat-conversation sample schema, sources that produce it, and an
encoder that turns it into model inputs with assistant-only labels using only the HF processor."""

from vlm_bridge.data.encode import EncodedSample, SampleEncoder, keep_first_media
from vlm_bridge.data.schema import validate_sample
from vlm_bridge.data.sources import (
    MAKERS,
    cord_v2,
    hf_samples,
    llava_video_178k,
    load_hf_dataset,
    load_json_samples,
    load_source,
    medpix,
    raven,
)

__all__ = [
    "MAKERS",
    "EncodedSample",
    "SampleEncoder",
    "cord_v2",
    "hf_samples",
    "keep_first_media",
    "llava_video_178k",
    "load_hf_dataset",
    "load_json_samples",
    "load_source",
    "medpix",
    "raven",
    "validate_sample",
]
