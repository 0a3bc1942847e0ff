"""Silence third-party noise that says nothing about our runs, in processes that run commands.

Megatron-Core announces at import that optional CUDA extensions (Transformer Engine, Apex) are
absent, and Megatron's checkpoint code trips deprecation warnings inside torch.distributed.checkpoint.
None of it is actionable for a user. Filtering them is a decision for the program that owns the
process (the CLI, a spawned or pooled rank), not a side effect of ``import vlm_bridge``: a library
import must not change a host application's warning filters or log levels. Test runs get the same
filters from ``[tool.pytest.ini_options] filterwarnings`` in pyproject.toml.
"""

from __future__ import annotations

import logging
import warnings

# Message regexes, matched against the start of the warning text (hence the leading ``.*``).
THIRD_PARTY_WARNINGS = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*`load_state_dict` is deprecated.*",  # inside Megatron's torch_dist loader
    ".*deprecating ShardedTensor.*",  # torch.distributed.checkpoint, used by Megatron
    ".*The following imports from `dynamic_context.py`.*",  # Megatron's own import cycle notice
    # Megatron warns of every TP x EP config, but it concerns training, and fine-tuning refuses
    # MoE at parallel.tp > 1 with its own message; import, verify and generate are unaffected.
    ".*When using expert parallelism and tensor parallelism for training.*",
    ".*`torch.distributed.all_gather_into_tensor` is deprecated.*",  # called inside Megatron
    # Megatron's hint for TP on a GPU, which init_distributed follows; it also fires on the CPU.
    ".*it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
    # Megatron keeps its torch RoPE for 3-D MRoPE over several rows (Transformer Engine's kernel
    # does not take per-row angles); it says so every time. The result is the same.
    ".*apply_rope_fusion does not support mRoPE in bshd format.*",
)


def quiet_third_party_warnings() -> None:
    """Ignore the warnings above and torch's "No CUDA runtime is found" log line.

    Idempotent; call it at the start of a process that runs a command, before Megatron is imported
    (its import-time warnings are among those filtered).
    """
    for pattern in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # torch logs "No CUDA runtime is found" when Megatron imports cpp_extension on a CPU machine.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
