"""Test-wide setup.

transformers is the numerical reference. With flash-linear-attention + triton installed it would pick fla kernels
at import time and every CPU forward would crash; its torch fallbacks are forced here before any test imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


def _force_transformers_torch_fallbacks() -> None:
    # transformers 5.23 binds fla / causal_conv1d when its modeling module is imported (decorator time), so the
    # packages are hidden before that import; a None entry in sys.modules makes `import fla` raise ImportError.
    if "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe" in sys.modules:
        raise RuntimeError("conftest must run before transformers' Qwen3.5 modeling module is imported")
    for name in ("fla", "causal_conv1d"):
        sys.modules.setdefault(name, None)


_force_transformers_torch_fallbacks()
