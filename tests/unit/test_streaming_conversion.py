"""Conversion streams: import and export of a model several times larger than the memory they may
add. Measured in a fresh process (anonymous resident memory sampled every 2 ms, glibc's mmap
threshold fixed so freed tensors go back to the system): each adds less than 35% of the model's
size, while filling the whole model (the old import) adds all of it; the round trip stays
bit-exact. (What remains is a few of the largest tensors, the read batch and the writer.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vlm_bridge.testing.checks import checkpoint_mismatches

MEASURE = textwrap.dedent('''
    import json, sys, threading, time

    def anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def added(fn):
        base, peak, stop = anon(), [0], threading.Event()
        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.002)
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            stop.set()
            thread.join()
        return max(peak[0], anon()) - base

    from vlm_bridge.convert import engine
    from vlm_bridge.loading import export_hf, import_hf, load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed, run_parallel

    def fill_whole_model(hf):
        init_distributed(ParallelConfig())
        load_hf(hf, ParallelConfig(), None)

    hf, work = sys.argv[1], sys.argv[2]
    engine.STREAM_BATCH_BYTES = 8 * 1024**2
    out = {
        "import": added(lambda: run_parallel(import_hf, 1, hf, work + "/meg", ParallelConfig(), None, True)),
        "export": added(lambda: run_parallel(export_hf, 1, work + "/meg", work + "/out", ParallelConfig(),
                                             None, True, 16 * 1024**2)),
        "filled": added(lambda: run_parallel(fill_whole_model, 1, hf)),
    }
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_import_and_export_stay_under_a_fraction_of_the_model(tmp_path):
    import torch

    from vlm_bridge.convert.hf_io import SafetensorsReader
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    hf = build_tiny_qwen2_5_vl(tmp_path / "hf", dtype=torch.bfloat16, config_overrides={"text_config": {
        "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "vocab_size": 8192,
        "num_attention_heads": 6, "num_key_value_heads": 2,
        # heads of 128: the real model's MRoPE split of the 64 rotary pairs
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}})
    with SafetensorsReader(hf) as reader:
        size = reader.total_bytes()
        largest = max(reader.get(name).nbytes for name in reader.keys())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "CI": "1"}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(hf), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    added = json.loads(run.stdout.strip().splitlines()[-1])
    cap = 0.35 * size
    assert size > 120e6 and largest < 0.08 * size, (size, largest)
    assert added["filled"] > 0.9 * size, (added, size)  # the sampler sees a whole model
    assert added["import"] < cap and added["export"] < cap, (added, size)
    assert checkpoint_mismatches(hf, tmp_path / "out") == []
