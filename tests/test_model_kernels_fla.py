"""Our calls of flash-linear-attention's chunked gated delta rule (`kernels.fla_delta_rule`: layout, in-kernel q / k
normalisation, scale, documents, initial and final states) and of its causal conv (`kernels.fla_conv_silu`: the
taps reset at document starts, silu) run on CPU tensors through Triton's interpreter and equal the torch paths,
values and gradients: packed rows, two value heads per key head, carried states, the context-parallel transition
pass (values widened by the state columns), 4 and 3 taps. Negative controls: fla told the row is one document is
far off, for both.

Needs fla and triton importable (`pip install flash-linear-attention triton`); skipped otherwise, as in CI: with both
installed transformers' CPU Qwen3.5 model would select fla, so the suite's environment never has them. The cases
run in a subprocess (`tests/fla_interpreter.py`, TRITON_INTERPRET=1 set before triton loads)."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest

# on the path (conftest hides fla from this process's imports: transformers must not pick it)
HAS_FLA = all(importlib.machinery.PathFinder.find_spec(m) is not None for m in ("fla", "triton"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLA, reason="flash-linear-attention and triton are not installed")
def test_fla_call_sites_equal_the_torch_path_under_the_triton_interpreter():
    script = Path(__file__).with_name("fla_interpreter.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    negative = results.pop("negative_one_document")
    negative_conv = results.pop("negative_conv_one_document")
    for name, errors in results.items():
        assert "error" not in errors, (name, errors)
        bound = 5e-3 if name.endswith("fp16") else 1e-5  # relative to the largest value of each tensor
        assert max(errors.values()) < bound, (name, errors)
    assert negative["output"] > 1e-2 and negative["final_state"] > 1e-2, negative
    assert negative_conv["output"] > 1e-2, negative_conv
