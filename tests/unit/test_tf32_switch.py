"""The TF32 matmul switch is read and set through whichever torch API the user's code set it
with: after ``fp32_precision`` was set, reading ``allow_tf32`` raises, so verify and the Mamba
scan must not. The mix is process-wide and sticky, hence a fresh interpreter per case."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import torch
from vlm_bridge.compat.tf32 import matmul_tf32, matmul_tf32_enabled
from vlm_bridge.families._common.ssd_triton import available
{setup}
assert matmul_tf32_enabled() is {initial}
with matmul_tf32(not {initial}):
    assert matmul_tf32_enabled() is (not {initial})
with matmul_tf32(None):
    pass
assert matmul_tf32_enabled() is {initial}
available(torch.device("cpu"), dtype=torch.float32)
print(torch.backends.cuda.matmul.{read_back})
"""


@pytest.mark.parametrize("setup, initial, read_back, expected", [
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True, "fp32_precision", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False, "fp32_precision", "ieee"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True, "allow_tf32", "True"),
    ("pass", False, "allow_tf32", "False"),
])
def test_switch_follows_the_api_in_use(setup, initial, read_back, expected):
    code = SCRIPT.format(setup=setup, initial=initial, read_back=read_back)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected
