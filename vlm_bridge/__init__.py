"""vlm-bridge: Hugging Face vision-language models <-> Megatron-Core."""

import logging
import warnings

# Megatron-Core announces at import that optional CUDA extensions are absent; we never need them.
for _pattern in (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*`load_state_dict` is deprecated.*",  # inside Megatron's torch_dist loader
    ".*deprecating ShardedTensor.*",  # torch.distributed.checkpoint, used by Megatron
):
    warnings.filterwarnings("ignore", message=_pattern)
# torch logs "No CUDA runtime is found" when Megatron imports cpp_extension on a CPU machine.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

__version__ = "0.1.0"
