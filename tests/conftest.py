"""Test-wide setup.

transformers is the numerical reference. With flash-linear-attention + triton installed it would pick fla kernels
at import time and every CPU forward would crash; its torch fallbacks are forced here before any test imports it.

Every process the tests start (cli.py runs, Lightning's rank processes, spawned gloo workers) inherits
PYTHONFAULTHANDLER=1: a rank that dies of a signal (SIGSEGV, SIGABRT) prints its Python stack to the captured
stderr instead of leaving only an exit code and its peers' "Connection closed by peer".

The launcher variables Lightning writes into this process's environment (`ddp_spawn` sets MASTER_PORT here, in the
parent) are put back after each test: left behind, every later multi-process run started from the tests would reuse
that one port, chosen minutes earlier and possibly taken since.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PYTHONFAULTHANDLER"] = os.environ.get("PYTHONFAULTHANDLER") or "1"
sys.path.insert(0, str(Path(__file__).parent))


def _force_transformers_torch_fallbacks() -> None:
    # transformers 5.23 binds fla / causal_conv1d when its modeling module is imported (decorator time), so the
    # packages are hidden before that import; a None entry in sys.modules makes `import fla` raise ImportError.
    if "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe" in sys.modules:
        raise RuntimeError("conftest must run before transformers' Qwen3.5 modeling module is imported")
    for name in ("fla", "causal_conv1d"):
        sys.modules.setdefault(name, None)


_force_transformers_torch_fallbacks()


# what Lightning's launchers and seed_everything write into the parent's environment
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                 "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def launcher_env_restored():
    before = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _restore_launcher_env():
    with launcher_env_restored():
        yield


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped, saying so, on a machine without one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
