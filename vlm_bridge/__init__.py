"""vlm-bridge: Hugging Face vision-language models <-> Megatron-Core."""

__version__ = "0.1.0"
