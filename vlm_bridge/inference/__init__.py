"""Inference on Megatron-Core models: decoding state, the generation loop, evaluation, video files."""
