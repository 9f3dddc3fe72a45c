"""Our flash-linear-attention call sites (the chunked gated delta rule and the causal conv) run on CPU tensors through
Triton's interpreter, against the torch paths.

Run as a script (in its own process: `TRITON_INTERPRET` must be set before triton is imported, and with fla and
triton importable transformers' CPU model would pick fla): prints one JSON object with the errors of every case.
`tests/test_model_kernels_fla.py` runs it where fla and triton are installed.

Two things make fla 0.6 run under the interpreter: its autotuner benchmarks configs through a GPU driver (one
config is kept: the interpreter's numbers do not depend on it), and its kernels loop `for i_t in range(NT)` and
call `i_t.to(tl.int64)`, which compiled Triton allows and the interpreter's Python ints do not (the modules' `range`
yields ints with a no-op `.to`). bf16 is wrong under the interpreter (numpy has no bf16: values overflow), so the
cases run in fp32 and fp16.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Int(int):
    def to(self, *args, **kwargs):
        return self


def _range(*args):
    return map(_Int, builtins.range(*(int(a) for a in args)))


def install_interpreter_shims() -> None:
    from triton.runtime import autotuner

    autotuner.Autotuner.prune_configs = lambda self, kwargs, *a, **k: self.configs[:1]
    import fla.ops

    for info in pkgutil.walk_packages(fla.ops.__path__, "fla.ops."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a backend this machine lacks
            continue
        module.range = _range


def _err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def compare(dtype, lengths, Hk, Hv, dk, dv, with_state: bool, seed: int = 0, fla_sees_one_document=False) -> dict:
    """fla through `kernels.fla_delta_rule` vs the torch chunked path: output, final states, every gradient.
    fla_sees_one_document: the negative control, fla called as if the row were one document."""
    import torch

    from qmoe_lightning.models import kernels
    from qmoe_lightning.models.delta_rule import chunk_gated_delta_rule_with_state
    from qmoe_lightning.models.packing import build_sequence_info

    g0 = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    info = build_sequence_info(1, T, torch.device("cpu"), cu_seqlens=cu)
    q = torch.randn(1, T, Hk, dk, generator=g0)
    k = torch.randn(1, T, Hk, dk, generator=g0)
    v = torch.randn(1, T, Hv, dv, generator=g0)
    g = -torch.rand(1, T, Hv, generator=g0) * 0.5
    beta = torch.rand(1, T, Hv, generator=g0)
    h0 = torch.randn(len(lengths), Hv, dk, dv, generator=g0) * 0.1 if with_state else None
    head = torch.randn(1, T, Hv, dv, generator=g0)
    head_state = torch.randn(len(lengths), Hv, dk, dv, generator=g0)

    def run(path):
        xs = [t.clone().to(dtype).requires_grad_() for t in (q, k, v)]
        gs = [t.clone().requires_grad_() for t in (g, beta)]
        s0 = h0.clone().requires_grad_() if h0 is not None else None
        if path == "fla":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            if fla_sees_one_document:  # the negative control: documents mix
                out, final = kernels.fla_delta_rule(chunk_gated_delta_rule, *xs, *gs,
                                                    build_sequence_info(1, T, torch.device("cpu")), None, True)
                final = final.expand(len(lengths), *final.shape[1:])
            else:
                out, final = kernels.fla_delta_rule(chunk_gated_delta_rule, *xs, *gs, info, s0, True)
        else:
            out, final = chunk_gated_delta_rule_with_state(*xs, *gs, info.chunk_layout(16), s0, True)
        loss = (out.float() * head).sum() + (final.float() * head_state).sum()
        loss.backward()
        grads = [t.grad for t in (*xs, *gs)] + ([s0.grad] if s0 is not None and s0.grad is not None else [])
        return out.detach(), final.detach(), grads

    o_f, s_f, g_f = run("fla")
    o_t, s_t, g_t = run("torch")
    names = ["q", "k", "v", "g", "beta"] + (["initial_state"] if with_state else [])
    return {"output": _err(o_f, o_t), "final_state": _err(s_f, s_t),
            **{f"grad_{n}": _err(a, b) for n, a, b in zip(names, g_f, g_t)}}


def compare_conv(dtype, lengths, D, W, seed: int = 0, fla_sees_one_document=False) -> dict:
    """fla's causal conv through `kernels.fla_conv_silu` vs the torch packed conv: output and gradients."""
    import torch

    from qmoe_lightning.models import kernels
    from qmoe_lightning.models.delta_rule import causal_depthwise_conv_packed
    from qmoe_lightning.models.packing import build_sequence_info

    g0 = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    info = build_sequence_info(1, T, torch.device("cpu"), cu_seqlens=cu)
    x0, w0 = torch.randn(1, T, D, generator=g0), torch.randn(D, W, generator=g0) * 0.5
    head = torch.randn(1, T, D, generator=g0)

    def run(path):
        x, w = x0.clone().to(dtype).requires_grad_(), w0.clone().to(dtype).requires_grad_()
        if path == "fla":
            from fla.modules.causal_conv1d import causal_conv1d

            seen = build_sequence_info(1, T, torch.device("cpu")) if fla_sees_one_document else info
            out = kernels.fla_conv_silu(causal_conv1d, x, w, seen)
        else:
            out = causal_depthwise_conv_packed(x, w, info.cu_seqlens)
        (out.float() * head).sum().backward()
        return out.detach(), [x.grad, w.grad]

    o_f, g_f = run("fla")
    o_t, g_t = run("torch")
    return {"output": _err(o_f, o_t), "grad_x": _err(g_f[0], g_t[0]), "grad_weight": _err(g_f[1], g_t[1])}


CONV_CASES = {  # name: (dtype, document lengths, channels, taps)
    "conv_packed_fp32": ("float32", [30, 3, 70, 17], 64, 4),
    "conv_taps3_fp32": ("float32", [50, 51], 32, 3),
}
NEGATIVE_CONV = ("float32", [30, 3, 70, 17], 64, 4)  # fla's conv told the row is one document: must be off


CASES = {  # name: (dtype, document lengths, Hk, Hv, dk, dv, initial states)
    "packed_fp32": ("float32", [30, 70, 17], 2, 2, 16, 16, False),
    "packed_gva_fp32": ("float32", [45, 64], 1, 2, 16, 32, False),  # two value heads per key head (Qwen3.5)
    "states_fp32": ("float32", [20, 81], 2, 2, 16, 16, True),  # context parallelism carries states
    "carry_columns_fp32": ("float32", [64], 2, 2, 16, 32, True),  # the CP transition pass: values [v | 0]
    "packed_fp16": ("float16", [30, 70], 2, 2, 16, 16, False),
}
NEGATIVE = ("float32", [30, 70, 17], 2, 2, 16, 16, False)  # fla told the row is one document: must be far off


def main() -> None:
    import torch

    install_interpreter_shims()
    torch.manual_seed(0)
    results = {}
    for name, (dtype, *args) in CASES.items():
        try:
            results[name] = compare(getattr(torch, dtype), *args)
        except Exception as e:  # reported per case: the test says which call site fails and how
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    for name, (dtype, *args) in CONV_CASES.items():
        try:
            results[name] = compare_conv(getattr(torch, dtype), *args)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    dtype, *args = NEGATIVE
    results["negative_one_document"] = compare(getattr(torch, dtype), *args, fla_sees_one_document=True)
    dtype, *args = NEGATIVE_CONV
    results["negative_conv_one_document"] = compare_conv(getattr(torch, dtype), *args, fla_sees_one_document=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
