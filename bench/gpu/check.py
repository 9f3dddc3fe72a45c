"""One-call GPU check: parity, a short app fit and the 35B-A3B-shaped benchmark, every figure into one JSON.

A task is lent a GPU rarely and briefly (one H200, 15 minutes of device time all tries together), so everything
that needs one runs in ONE device call of <= 8 minutes (`bench/gpu/run.sh`), and `--dry-run` runs the same code on
CPU with tiny shapes in CI (tests/test_gpu_check.py) so that the script never rots.

Steps (each timed, each with its own time budget inside an overall one; a failing or timed-out step is recorded and
the next one still runs; the JSON is rewritten after every step, so a killed run still leaves what it measured):

  facts    machine and versions (torch, CUDA, GPU, transformers, fla, triton, ...), varlen_attn's signature, a bf16
           matmul ceiling measured on the spot
  parity   native vs transformers (the reference a user gets there: fla when installed) on the tests' tiny configs
           of every registered family (tests/families.py), fp32 (tight) and bf16 (reported): text, image and video
           documents (text only for a text-only family), max |logit
           diff|, loss and aux diffs; a packed row vs each document alone (native) and vs transformers alone; which
           kernel paths the native model took (see KernelSpy)
  cp_kernels  context parallelism's kernel calls on one rank's view (a stand-in comm, one process), vs an fp64
           reference on the device: the queries of every rank (cp 2, 4) against the gathered padded keys (one
           varlen_attn call with cu_seq_q != cu_seq_k on CUDA bf16, its lower-right causal alignment; the SDPA
           fallback too), and the delta rule (fla on CUDA) from given per-document states with the final states
           out, values widened to dv + dk, the carry pass ([v | 0] from [0 | I]) and M S0 + B, with gradients
  fit      `cli.py fit --config configs/tiny.yaml` on the device (GPU: bf16-true, 30 steps; dry run: CPU, 2 steps) as a
           subprocess: return code, tokens/s and losses from a CSV logger
  bench    a Qwen3.5-35B-A3B-shaped slice (hidden 2048, 16 q / 2 kv heads of 256, Gated DeltaNet 16 k / 32 v heads
           of 128, 256 experts top-8 of 512, shared expert 512, 3 linear : 1 full layers, vocab 248320; 8 layers by
           default), bf16, forward+backward on packed rows of 4K and 16K tokens of log-normal documents
           (bench/bench_model.py's document_lengths, the last one cut so a row is exactly that long): tokens/s, MFU on
           active parameters, peak memory; transformers on the same documents padded into a batch and on the same
           packed row taken as one sequence (its numerics leak across documents: a speed reference only); a
           profile of one native step (top kernels)
  kernels  each kernel path alone at the benchmark's shapes: the path the model takes vs the torch reference (max
           diff, forward+backward time), fla's Triton causal conv with cu_seqlens included when fla is there
  memory   the memory planner (`python -m qmoe_lightning.plan`) against the device: one training step of the
           benchmark's model on 4 layers (bf16-true, activation checkpointing, a 4096-token row; dry run: its tiny
           config, fp32, 512 tokens) planned on fake tensors and run for real (random init, routing forced balanced
           as planned): planned and measured peak (torch.cuda.max_memory_allocated) and their ratio

MFU = 6 x active parameters x tokens / step time / peak, active parameters = every parameter except the token
embedding and the vision tower, routed experts counted top_k / num_experts; peak = 989e12 FLOP/s (H100/H200 SXM
dense bf16, datasheet); the JSON also gives it against the matmul rate measured in `facts`. Attention's quadratic
FLOPs are left out of that formula and given beside it (`mfu_with_attention`).

    python bench/gpu/check.py --out DIR            # on a CUDA machine (bench/gpu/run.sh is the device call)
    python bench/gpu/check.py --dry-run --out DIR  # CPU, tiny shapes, < 1 minute on 2 cores
Options: --budget S (overall, default 420), --step-budget STEP=S, --only facts,parity,... , --layers N,
--rows 4096,16384, --threads N (dry run only, default 1), --fail-step parity,kernels:hang (or env QMOE_GPU_CHECK_FAIL:
that step raises / hangs at its start; the negative controls of tests/test_gpu_check.py).
Exit status 0 when no step recorded a failure, 1 otherwise, 2 without CUDA and without --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT / "bench", ROOT / "tests", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16, datasheet
STEPS = ("facts", "parity", "cp_kernels", "fit", "bench", "kernels", "memory")
# seconds, capped by the overall one
BUDGETS = {"facts": 30, "parity": 90, "cp_kernels": 60, "fit": 100, "bench": 170, "kernels": 40, "memory": 60}
VERSIONS = ("torch", "triton", "transformers", "flash-linear-attention", "fla-core", "causal-conv1d", "lightning",
            "pytorch-lightning", "datasets", "jsonargparse", "peft", "huggingface-hub", "tokenizers", "safetensors",
            "accelerate", "pyarrow", "fsspec", "regex", "torchvision", "numpy", "einops")

# parity documents: tiny_configs.PACKED_DOCS' long-text row (lengths not multiples of 64, one over three chunks)
CASES = {"text": [37], "image": [5, ("image", (1, 4, 6)), 9], "video": [4, ("video", (2, 4, 4)), 5]}
PACKED_DOCS = [[5, ("image", (1, 4, 6)), 60], [131], [3, ("image", (1, 4, 4)), 11, ("image", (1, 6, 8)), 14], [45],
               [2, ("video", (2, 4, 4)), 9]]
TEXT_PACKED_DOCS = [[65], [131], [11], [45], [1], [29]]  # a text-only family's row: the same kinds of lengths


class StepTimeout(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------ logging
class Log:
    def __init__(self, path: Path | None):
        self.file = open(path, "a", buffering=1) if path else None

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")


LOG = Log(None)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rnd(x, digits: int = 6):
    return float(f"{x:.{digits}g}") if finite(x) else x


# ------------------------------------------------------------------------------------------------- kernel-path spy
class KernelSpy:
    """Counts which kernel paths the native model calls, by wrapping the functions `qmoe_lightning.models.kernels`
    and `moe` pick between (looked up by name at call time there, so wrapping the module attribute is enough):
    every `_*_fn` factory of kernels.py (fla's chunk, causal-conv1d, any added later) counts the calls of what it
    returns; the torch references, `varlen_attn`, SDPA, `grouped_mm` and the per-expert `segment_mm` loop count their
    calls. Counting happens only inside `with spy.watch():` (the native model's calls, not transformers'). A name
    that is no longer there is listed under `not_found` (a rename, not a failure)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.not_found: list[str] = []
        self.active = False
        self.installed = False

    def _counting(self, label, fn):
        spy = self

        def wrapped(*a, **k):
            if spy.active:
                spy.counts[label] += 1
            return fn(*a, **k)

        wrapped.__wrapped__ = fn
        return wrapped

    def _factory(self, label, factory):
        spy = self

        def wrapped(*a, **k):
            fn = factory(*a, **k)
            return None if fn is None else spy._counting(label, fn)

        return wrapped

    def install(self) -> None:
        if self.installed:
            return
        import torch.nn.functional as F

        from qmoe_lightning.models import kernels, moe

        for name in sorted(vars(kernels)):
            obj = getattr(kernels, name)
            if name.startswith("_") and name.endswith("_fn") and callable(obj):
                setattr(kernels, name, self._factory(name.strip("_")[:-3], obj))
        for mod, attr, label in ((kernels, "chunk_gated_delta_rule_with_state", "torch_delta_rule"),
                                 (kernels, "causal_depthwise_conv_packed", "torch_causal_conv"),
                                 (moe, "grouped_mm", "grouped_mm"), (moe, "segment_mm", "segment_mm_loop"),
                                 (F, "scaled_dot_product_attention", "sdpa")):
            if callable(getattr(mod, attr, None)):
                setattr(mod, attr, self._counting(label, getattr(mod, attr)))
            else:
                self.not_found.append(f"{mod.__name__}.{attr}")
        try:
            varlen = importlib.import_module("torch.nn.attention.varlen")
            varlen.varlen_attn = self._counting("varlen_attn", varlen.varlen_attn)
        except ImportError:
            self.not_found.append("torch.nn.attention.varlen.varlen_attn")
        self.installed = True

    @contextlib.contextmanager
    def watch(self):
        self.counts.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def snapshot(self) -> dict:
        return dict(sorted(self.counts.items()))


SPY = KernelSpy()


def paths_taken(counts: dict) -> dict:
    """Which implementation of each op ran, from the spy's counts."""
    conv = [k for k in counts if "conv" in k and k != "torch_causal_conv"]
    return {
        "delta_rule": "fla" if counts.get("fla_chunk") else ("torch" if counts.get("torch_delta_rule") else "none"),
        "causal_conv": (conv[0] if conv else ("torch" if counts.get("torch_causal_conv") else "none")),
        "attention": "varlen_attn" if counts.get("varlen_attn") else ("sdpa" if counts.get("sdpa") else "none"),
        "experts": "grouped_mm" if counts.get("grouped_mm") else (
            "segment_mm_loop" if counts.get("segment_mm_loop") else "none"),
    }


DISABLED: list[str] = []  # fast paths that raised on this machine and were taken out for the rest of the run


def disable(kind: str) -> None:
    """Take one fast path out of the native model's choices for the rest of the run ("varlen" or "fla"), so the
    remaining figures still come (from the fallback, labelled; the error that caused it stays recorded)."""
    from qmoe_lightning.models import kernels

    if kind in DISABLED:
        return
    DISABLED.append(kind)
    if kind == "varlen":
        has = kernels._has
        kernels._has = lambda module: False if module == "torch.nn.attention.varlen" else has(module)
    else:  # fla's chunked delta rule and its causal conv
        kernels._fla_chunk_fn = lambda: None
        kernels._fla_conv_fn = lambda: None


def with_fallbacks(fn, errors: list, where: str):
    """fn(); if it raised inside varlen_attn or fla, record the error, disable that path for good and rerun.
    Returns (result, paths disabled by this call)."""
    try:
        return fn(), []
    except StepTimeout:
        raise
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc()
        kinds = [k for k, marks in (("varlen", ("varlen",)), ("fla", ("/fla/", "fla."))) if any(m in tb for m in marks)
                 and k not in DISABLED]
        errors.append({"where": where, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-4000:],
                       "disabled_after": kinds})
        LOG(f"  ! {where}: {type(e).__name__}: {str(e)[:300]}" + (f" -> {kinds} disabled, rerun" if kinds else ""))
        if not kinds:
            raise
        for k in kinds:
            disable(k)
        return with_fallbacks(fn, errors, where)[0], kinds


# --------------------------------------------------------------------------------------------------------- helpers
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(step, device, warmup: int, steps: int, deadline: float | None = None) -> dict:
    """step() `warmup` times, then `steps` times; CUDA-synchronised wall time. min is the figure (robust to noise);
    the first call (compilation, autotuning) is given apart. Stops timing early past `deadline` (>= 1 timed step)."""
    times = []
    first = None
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
            if deadline is not None and time.monotonic() > deadline:
                break
    return {"min_s": rnd(min(times)), "median_s": rnd(sorted(times)[len(times) // 2]), "steps_s": [rnd(t) for t in times],
            "first_call_s": rnd(first), "warmup": warmup}


def memory_gib(device) -> float:
    """Allocated now: CUDA memory, or on CPU the process's resident set."""
    import torch

    if device.type == "cuda":
        return rnd(torch.cuda.memory_allocated() / 2**30, 4)
    with open("/proc/self/statm") as f:
        return rnd(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30, 4)


def peak_memory_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return rnd(torch.cuda.max_memory_allocated() / 2**30, 4)
    return rnd(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 4)


def to_device(batch: dict, device) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def record_error(errors: list, where: str, e: BaseException, *, once: bool = False, log: bool = True,
                 prefix: str = "") -> None:
    """Append a failure (called inside its `except`: the traceback is the current one) and log it; `once`: not if
    `where` already failed."""
    if not (once and any(x["where"] == where for x in errors)):
        errors.append({"where": where, "error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]})
    if log:
        LOG(f"  ! {prefix}{where}: {type(e).__name__}: {str(e)[:300]}")


def text_labels(batch: dict):
    labels = batch["input_ids"].clone()
    labels[batch["mm_token_type_ids"] != 0] = -100
    return labels


def version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------------------ steps
def step_facts(res: dict, ctx: dict) -> None:
    import torch

    device = ctx["device"]
    res["mode"] = ctx["mode"]
    res["python"] = platform.python_version()
    res["platform"] = platform.platform()
    res["cpu_count"] = os.cpu_count()
    res["versions"] = {d: version(d) for d in VERSIONS}
    import transformers

    res["transformers_imported"] = {"version": transformers.__version__, "file": transformers.__file__}
    res["torch_cuda"] = torch.version.cuda
    res["cuda_available"] = torch.cuda.is_available()
    res["device"] = str(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                      "memory_gib": rnd(p.total_memory / 2**30, 4)}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            res["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            res["nvidia_smi"] = f"unavailable: {e}"
    res["fla_visible"] = ctx["fla_visible"]
    if ctx["fla_visible"]:
        t0 = time.perf_counter()
        try:
            import fla  # noqa: F401

            res["fla_import"] = {"ok": True, "seconds": rnd(time.perf_counter() - t0, 3)}
        except Exception as e:  # noqa: BLE001
            res["fla_import"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    res["has_grouped_mm"] = hasattr(torch, "_grouped_mm")
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        res["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except ImportError as e:
        res["varlen_attn_signature"] = f"missing: {e}"
    # a bf16 matmul ceiling, measured here (KINDS.md saw ~790 TFLOP/s on an H200 at 8192^3)
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_steps(lambda: a @ b, device, warmup=2, steps=5)
    res["matmul_bf16"] = {"n": n, "tflops": rnd(2 * n**3 / t["min_s"] / 1e12, 4)}
    ctx["matmul_flops"] = 2 * n**3 / t["min_s"]
    a = b = None
    LOG(f"  {res.get('gpu', {}).get('name', 'cpu')}: torch {torch.__version__} cuda {torch.version.cuda}, transformers "
        f"{transformers.__version__}, fla {res['versions']['flash-linear-attention']}, triton {res['versions']['triton']}"
        f", causal-conv1d {res['versions']['causal-conv1d']}; bf16 matmul {res['matmul_bf16']['tflops']} TFLOP/s")


def _family(name: str):
    """(tiny config, transformers reference builder, native class, has vision) of a registered family, from the
    tests' family table (tests/families.py: one entry per family of the registry)."""
    from families import FAMILIES

    f = FAMILIES[name]
    return f.make_config("base"), f.make_hf_model, f.native, f.has_vision


def _parity_one(family: str, dtype_name: str, device, tmp: Path, errors: list) -> dict:
    import torch
    import transformers
    from tiny_configs import pack, vision_doc

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg, make_hf, native_cls, vision = _family(family)
    path = tmp / f"{family}"
    hf_cls = getattr(transformers, native_cls.HF_ARCHITECTURE)
    if dtype_name == "fp32" or not (path / "config.json").exists():
        hf = make_hf(cfg, seed=11)  # the tests' reference: fp32, eager experts (grouped_mm rejects CUDA fp32)
        hf.save_pretrained(path)
        hf = hf.to(device).eval()
    if dtype_name == "bf16":  # what a user gets in bf16: transformers' default experts implementation, the same weights
        hf = hf_cls.from_pretrained(path, dtype=dtype).to(device).eval()
    native = native_cls.from_pretrained(path, dtype=dtype, device=device).eval()
    out = {"hf_experts_implementation": str(getattr(hf.config, "_experts_implementation", None)),
           "hf_attn_implementation": str(getattr(hf.config, "_attn_implementation", None)), "cases": {}}
    counts: Counter = Counter()

    def native_call(**kw):
        with SPY.watch():
            o = native(**kw)
        counts.update(SPY.counts)
        return o

    with torch.no_grad():
        for case, pieces in CASES.items() if vision else [("text", CASES["text"])]:
            batch = to_device(vision_doc(pieces, seed=3), device)
            labels = text_labels(batch)
            batch = batch if vision else {"input_ids": batch["input_ids"]}  # a text-only model takes ids alone
            ref = hf(**batch, labels=labels, output_router_logits=True)
            got, retried = with_fallbacks(lambda: native_call(**batch, labels=labels, output_router_logits=True),
                                          errors, f"parity {family} {dtype_name} {case}")
            out["cases"][case] = {
                "tokens": batch["input_ids"].shape[1],
                "max_abs_logit_diff": rnd((ref.logits.float() - got.logits.float()).abs().max().item()),
                "max_abs_logit": rnd(ref.logits.float().abs().max().item()),
                "loss_diff": rnd(abs(ref.loss.item() - got.loss.item())),
                "aux_loss_diff": rnd(abs(ref.aux_loss.item() - got.aux_loss.item())),
                **({"disabled_after_error": retried} if retried else {}),
            }
        docs = [to_device(vision_doc(p, seed=20 + i), device)
                for i, p in enumerate(PACKED_DOCS if vision else TEXT_PACKED_DOCS)]
        row = pack(docs)
        labels = text_labels(row)
        if not vision:
            docs = [{"input_ids": d["input_ids"]} for d in docs]
            row = {k: row[k] for k in ("input_ids", "cu_seqlens")}
        packed, retried = with_fallbacks(lambda: native_call(**row, labels=labels, output_router_logits=True),
                                         errors, f"parity {family} {dtype_name} packed")
        cu = row["cu_seqlens"].tolist()
        vs_alone, vs_hf, ce_sum, n_sum = 0.0, 0.0, 0.0, 0
        for i, doc in enumerate(docs):
            lab = labels[:, cu[i]:cu[i + 1]]
            alone = native_call(**doc, labels=lab)
            ref = hf(**doc)
            piece = packed.logits[:, cu[i]:cu[i + 1]].float()
            vs_alone = max(vs_alone, (piece - alone.logits.float()).abs().max().item())
            vs_hf = max(vs_hf, (piece - ref.logits.float()).abs().max().item())
            ce_sum += alone.ce_loss.item() * int(alone.num_label_tokens)
            n_sum += int(alone.num_label_tokens)
        out["packed"] = {"documents": len(docs), "tokens": cu[-1],
                         "max_abs_logit_diff_vs_native_alone": rnd(vs_alone),
                         "max_abs_logit_diff_vs_transformers_alone": rnd(vs_hf),
                         "ce_diff_vs_sum_of_documents": rnd(abs(packed.ce_loss.item() - ce_sum / n_sum)),
                         **({"disabled_after_error": retried} if retried else {})}
    out["kernel_calls"] = dict(sorted(counts.items()))
    out["paths"] = paths_taken(out["kernel_calls"])
    out["max_abs_logit_diff"] = rnd(max([c["max_abs_logit_diff"] for c in out["cases"].values()]
                                        + [out["packed"]["max_abs_logit_diff_vs_transformers_alone"]]))
    out["max_loss_diff"] = rnd(max(c["loss_diff"] for c in out["cases"].values()))
    hf = native = None
    return out


def step_parity(res: dict, ctx: dict) -> None:
    import torch

    device = ctx["device"]
    tol = {"fp32": 1e-4 if device.type == "cpu" else 2e-3, "bf16": 0.25}  # bf16: a flag, not a bound
    res["tolerance_max_abs_logit_diff"] = tol
    res["note"] = ("fp32 with TF32 off (matmul and cuDNN); bf16 is reported, its tolerance is only a flag. "
                   "transformers runs fla when installed (conftest-style hiding only on CPU).")
    errors = res.setdefault("errors", [])
    with tempfile.TemporaryDirectory(prefix="gpu_check_parity_") as tmp:
        from families import FAMILIES

        for family in FAMILIES:  # every registered family (the tests' table fails for one without an entry)
            for dtype_name in ("fp32", "bf16"):
                key = f"{family}/{dtype_name}"
                t0 = time.perf_counter()
                tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    r = _parity_one(family, dtype_name, device, Path(tmp), errors)
                    r["within_tolerance"] = bool(r["max_abs_logit_diff"] <= tol[dtype_name])
                    r["seconds"] = rnd(time.perf_counter() - t0, 3)
                    res[key] = r
                    LOG(f"  {key}: max |logit diff| {r['max_abs_logit_diff']:.3g} (tol {tol[dtype_name]}), loss diff "
                        f"{r['max_loss_diff']:.3g}, packed vs alone {r['packed']['max_abs_logit_diff_vs_native_alone']:.3g}"
                        f"; paths {r['paths']} ({r['seconds']} s)")
                except StepTimeout:
                    raise
                except Exception as e:  # noqa: BLE001
                    record_error(errors, key, e)
                finally:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
                    free_memory()


CP_DOCS = [150, 37, 300, 90, 1]  # cp_kernels' packed row: lengths not multiples of 64, one of a single token
CP_TOL = {"attention": {"fp32": 1e-5, "bf16": 2e-2}, "delta_rule": {"fp32": 1e-4, "bf16": 2e-2},
          "delta_rule_grad": {"fp32": 1e-4, "bf16": 5e-2}}  # max |err| / max |reference|


def _rel_err(got, ref) -> dict:
    """max |got - ref| and that over max |ref| (both in fp64)."""
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return {"max_abs_err": rnd(err), "max_abs_ref": rnd(scale), "rel_err": rnd(err / scale if scale else err)}


def step_cp_kernels(res: dict, ctx: dict) -> None:
    """Context parallelism's kernel calls, single process (a rank's view built with a stand-in comm), against an fp64
    reference on the same device from the same (bf16 on CUDA, fp32 in the dry run) inputs:
    (a) `context_parallel.attend_gathered`: every rank's queries vs the gathered (padded) keys of the whole row, at
        cp 2 and 4: on CUDA bf16 one `varlen_attn` call with cu_seq_q != cu_seq_k (flash-attention's lower-right
        causal alignment), also the SDPA fallback (explicit lower-right masks);
    (b) `kernels._delta_rule_with_state` (fla on CUDA) from a random per-document initial state with the final states
        out (cu_seqlens packed), the same with values widened to dv + dk, the exact transition call of
        `context_parallel.delta_rule_with_carry` (one unpacked segment, values [v | 0] from [0 | I]) and the affine
        composition M S0 + B it feeds, then gradients of all of these (time permitting)."""
    import types

    import torch
    import torch.nn.functional as F

    from qmoe_lightning.models import context_parallel, kernels
    from qmoe_lightning.models.delta_rule import recurrent_gated_delta_rule_reference
    from qmoe_lightning.models.packing import build_sequence_info

    device, dry = ctx["device"], ctx["mode"] == "dry_run"
    dt = torch.float32 if dry else torch.bfloat16
    dname = "fp32" if dry else "bf16"
    errors = res.setdefault("errors", [])
    tol = {k: v[dname] for k, v in CP_TOL.items()}
    T, N = sum(CP_DOCS), len(CP_DOCS)
    cu = torch.tensor([0, *torch.tensor(CP_DOCS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    whole = build_sequence_info(1, T, device, cu)
    g = torch.Generator(device=device).manual_seed(0)
    res.update(dtype=dname, documents=CP_DOCS, tokens=T, tolerance_rel_err=tol,
               reference="fp64 on the same device from the same inputs: attention = SDPA per document (math), delta "
                         "rule = delta_rule.recurrent_gated_delta_rule_reference (token loop); rel_err = max |err| / "
                         "max |reference|; TF32 off",
               expected_paths={"attention": "varlen_attn" if device.type == "cuda" else "sdpa",
                               "delta_rule": "fla" if device.type == "cuda" and ctx["fla_visible"] else "torch"})
    flags: dict[str, bool] = {}
    seen: dict[str, set] = {"attention": set(), "delta_rule": set()}

    def randn(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    def judge(key: str, r: dict, kind: str) -> dict:
        r["within_tolerance"] = bool(r["rel_err"] <= tol[kind])
        flags[key] = r["within_tolerance"]
        return r

    def left() -> float:
        return ctx["step_deadline"] - time.monotonic()

    def rank_view(cp: int, r: int, q, k, v):
        """Rank r of cp: its SequenceInfo (split_row reads only the comm's rank and size), its queries, the gathered
        keys / values of the padded row (2, 1, Hkv, T_padded, D), as `context_parallel.attention` has them."""
        local = context_parallel.split_row(types.SimpleNamespace(rank=r, size=cp), whole, min_slice=3)
        pad = local.cp.padded_len - T
        kv = torch.stack([torch.cat([x, x.new_zeros(*x.shape[:2], pad, x.shape[3])], dim=2) for x in (k, v)])
        return local, local.cp.take(q, 2), kv

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        # ---------------------------------------------------------------- (a) attention over the gathered keys
        Hq, Hkv = (4, 2) if dry else (8, 2)
        att = res["attention"] = {}
        for D in ((16,) if dry else (128, 256)):
            key = f"D{D}"
            try:
                out_d = att[key] = {"heads": [Hq, Hkv]}
                # the attention layer's layouts: q, k head-major (rotary's cat), v a token-major view
                q, k, v = randn(1, Hq, T, D), randn(1, Hkv, T, D), randn(1, T, Hkv, D).transpose(1, 2)
                scale = D ** -0.5
                with torch.no_grad():
                    ref = kernels.causal_attention(q.double(), k.double(), v.double(), whole, scale)
                    with SPY.watch():
                        same = kernels.causal_attention(q, k, v, whole, scale)
                        calls = SPY.snapshot()
                out_d["whole_row"] = {"path": paths_taken(calls)["attention"], **_rel_err(same, ref)}
                variants = {"model_path": True} | ({"sdpa_fallback": False} if device.type == "cuda" else {})
                for cp in (2, 4):
                    for label, use_varlen in variants.items():
                        where = f"attention/{key}/cp{cp}/{label}"
                        try:
                            calls, ranks, worst, vs_whole = Counter(), [], None, 0.0
                            for r in range(cp):
                                local, q_local, kv = rank_view(cp, r, q, k, v)
                                cs = local.cp
                                fn = kernels._varlen_fn(q_local) if use_varlen else None
                                with torch.no_grad(), SPY.watch():
                                    out = context_parallel.attend_gathered(q_local, kv, local, scale, varlen=fn)
                                    calls.update(SPY.counts)
                                if tuple(out.shape) != (1, cs.end - cs.start, Hq, D):
                                    raise RuntimeError(f"rank {r}: output shape {tuple(out.shape)}, expected "
                                                       f"{(1, cs.end - cs.start, Hq, D)}")
                                stop = min(cs.end, T)  # rows past the row's end are padding queries
                                e = _rel_err(out[:, :stop - cs.start], ref[:, cs.start:stop])
                                e["segments"] = len(local.doc_bounds)
                                ranks.append(e)
                                vs_whole = max(vs_whole, (out[:, :stop - cs.start].double()
                                                          - same[:, cs.start:stop].double()).abs().max().item())
                                if worst is None or e["max_abs_err"] > worst["max_abs_err"]:
                                    worst = dict(e, rank=r)
                            calls = dict(sorted(calls.items()))
                            out_d[f"cp{cp}/{label}"] = judge(where, {
                                "path": paths_taken(calls)["attention"], "calls": calls,
                                "max_abs_err": worst["max_abs_err"], "rel_err": rnd(max(x["rel_err"] for x in ranks)),
                                "worst_rank": worst["rank"], "per_rank": ranks,
                                "max_abs_diff_vs_whole_row_same_dtype": rnd(vs_whole)}, "attention")
                            if label == "model_path":
                                seen["attention"].add(out_d[f"cp{cp}/{label}"]["path"])
                        except StepTimeout:
                            raise
                        except Exception as e:  # noqa: BLE001
                            record_error(errors, where, e, prefix="cp_kernels ")
                # negative control: upper-left causal masks (queries of a segment taken as the FIRST rows of its
                # keys, what an alignment mix-up would compute), fp64, must be far off
                bad = 0.0
                for r in range(4):
                    local, q_local, kv = rank_view(4, r, q.double(), k.double(), v.double())
                    cs = local.cp
                    for (a, b), doc_start in zip(local.doc_bounds, cs.segment_doc_start):
                        stop = min(cs.start + b, T)
                        if stop <= cs.start + a or doc_start == cs.start + a:  # padding, or no keys before it
                            continue
                        o = F.scaled_dot_product_attention(q_local[:, :, a:b], kv[0, :, :, doc_start:cs.start + b],
                                                           kv[1, :, :, doc_start:cs.start + b], is_causal=True,
                                                           scale=scale, enable_gqa=True).transpose(1, 2)
                        bad = max(bad, _rel_err(o[:, :stop - cs.start - a], ref[:, cs.start + a:stop])["rel_err"])
                out_d["negative_control_upper_left_rel_err"] = rnd(bad)
                whole_row = out_d["whole_row"]
                LOG(f"  attention {key}: whole row ({whole_row['path']}) rel {whole_row['rel_err']:.3g}; "
                    + ", ".join(f"{k_} ({v_['path']}) rel {v_['rel_err']:.3g}" for k_, v_ in out_d.items()
                                if k_.startswith("cp")) + f" (tol {tol['attention']}); upper-left masks (negative "
                    f"control) rel {bad:.3g}")
            except StepTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                record_error(errors, f"attention/{key}", e, prefix="cp_kernels ")

        # ---------------------------------------------------------------- (b) the delta rule from a given state
        Hk, Hv, dk, dv = (2, 4, 32, 32) if dry else (2, 4, 128, 128)
        dr = res["delta_rule"] = {"heads": [Hk, Hv], "dk": dk, "dv": dv}
        q, k = randn(1, T, Hk, dk), randn(1, T, Hk, dk)
        v = randn(1, T, Hv, dv)
        # fp32 log decay as the model's; mild decay and beta so that a state 300 tokens back still counts (the
        # transition's M, the initial states): a check that cannot see them checks nothing
        g_ = -torch.rand(1, T, Hv, generator=g, device=device) * 0.005
        beta = (torch.rand(1, T, Hv, generator=g, device=device) * 0.5).to(dt)
        init = randn(N, Hv, dk, dv, dtype=torch.float32)
        v_wide = torch.cat([v, v.new_zeros(1, T, Hv, dk)], dim=-1)
        eye = torch.eye(dk, device=device).expand(Hv, dk, dk)
        init_wide = torch.cat([init, randn(N, Hv, dk, dk, dtype=torch.float32)], dim=-1)
        init_wide[0] = torch.cat([torch.zeros(Hv, dk, dv, device=device), eye], dim=-1)  # doc 0 from [0 | I]
        s, e_ = next((a, b) for a, b in whole.doc_bounds if b - a == max(CP_DOCS))  # the transition's segment
        seg = build_sequence_info(1, e_ - s, device)  # unpacked, as delta_rule_with_carry builds it
        start = torch.cat([torch.zeros(Hv, dk, dv, device=device), eye], dim=-1).unsqueeze(0)

        def reference(q_, k_, v_, g__, b_, cu_, init_):
            finals: list = []
            out = recurrent_gated_delta_rule_reference(*(x.double() for x in (q_, k_, v_, g__, b_)), cu_seqlens=cu_,
                                                       initial_state=None if init_ is None else init_.double(),
                                                       finals=finals)
            return out, torch.stack(finals)

        def device_path(label, *args):
            with SPY.watch():
                out, final = kernels._delta_rule_with_state(*args)
                calls = SPY.snapshot()
            path = paths_taken(calls)["delta_rule"]
            seen["delta_rule"].add(path)
            return out, final, {"path": path, "calls": calls}

        cases = {  # label -> (inputs, info, cu for the reference, initial state)
            "packed_with_state": ((q, k, v, g_, beta), whole, cu, init),
            "wide_values": ((q, k, v_wide, g_, beta), whole, cu, init_wide),
            "transition": ((q[:, s:e_], k[:, s:e_], v_wide[:, s:e_], g_[:, s:e_], beta[:, s:e_]), seg, None, start),
        }
        carry = None
        for label, (xs, info, cu_, init_) in cases.items():
            where = f"delta_rule/{label}"
            try:
                with torch.no_grad():
                    out, final, meta = device_path(label, *xs, info, init_, True)
                    ref_out, ref_final = reference(*xs, cu_, init_)
                r = {**meta, "value_width": xs[2].shape[-1], "documents": ref_final.shape[0]}
                if label != "transition":  # the transition's output is never used, only its final state
                    r["out"] = judge(where + "/out", _rel_err(out, ref_out), "delta_rule")
                if label == "transition":  # [B | M], each against its own scale (M may be much smaller than B)
                    r["final_state"] = _rel_err(final, ref_final)
                    for part, cols in (("B", slice(None, dv)), ("M", slice(dv, None))):
                        r[f"final_state_{part}"] = judge(f"{where}/final_state_{part}",
                                                         _rel_err(final[..., cols], ref_final[..., cols]), "delta_rule")
                else:
                    r["final_state"] = judge(where + "/final_state", _rel_err(final, ref_final), "delta_rule")
                if label == "packed_with_state":
                    with torch.no_grad():  # the reference chunked path in fp32 (CUDA's fallback), and a sensitivity
                        t_out, t_final = kernels.chunk_gated_delta_rule_with_state(
                            *(x.float() for x in xs), whole.chunk_layout(64), init_, True)
                        z_out, z_final = reference(*xs, cu_, None)
                    r["torch_chunk_fp32"] = {"out": _rel_err(t_out, ref_out),
                                             "final_state": _rel_err(t_final, ref_final)}
                    # negative control: what the initial state changes (the check must see far more than its tol)
                    r["initial_state_effect"] = {"out": _rel_err(z_out, ref_out)["rel_err"],
                                                 "final_state": _rel_err(z_final, ref_final)["rel_err"]}
                if label == "transition":
                    carry = final[0].double()  # [B | M], (Hv, dk, dv + dk)
                dr[label] = r
                LOG(f"  delta_rule {label} ({meta['path']}, values {r['value_width']}): "
                    + ", ".join(f"{k_} rel {r[k_]['rel_err']:.3g}" for k_ in ("out", "final_state", "final_state_B",
                                                                           "final_state_M") if k_ in r)
                    + f" (tol {tol['delta_rule']})")
            except StepTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                record_error(errors, where, e, prefix="cp_kernels ")
        if carry is not None:  # what the rank after does with the carry: S = M S0 + B == the segment run from S0
            where = "delta_rule/affine_carry"
            try:
                s0 = init[CP_DOCS.index(e_ - s)].double()
                xs = (q[:, s:e_], k[:, s:e_], v[:, s:e_], g_[:, s:e_], beta[:, s:e_])
                _, direct = reference(*xs, None, s0.unsqueeze(0))
                composed = carry[..., dv:] @ s0 + carry[..., :dv]
                dr["affine_carry"] = judge(where, _rel_err(composed, direct[0]), "delta_rule")
                # sensitivity: the share of the incoming state in the result (a wrong or missing M shows this much)
                dr["affine_carry"]["m_s0_share"] = rnd((carry[..., dv:] @ s0).abs().max().item()
                                                       / direct.abs().max().item())
                LOG(f"  delta_rule affine carry M S0 + B vs the segment from S0: rel "
                    f"{dr['affine_carry']['rel_err']:.3g} (max |M S0| / max |S|: "
                    f"{dr['affine_carry']['m_s0_share']:.3g})")
            except StepTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                record_error(errors, where, e, prefix="cp_kernels ")

        # ------------------------------------------- gradients (CP's backward: d final state in, d initial state out)
        grads = dr["gradients"] = {}
        for label in ("packed_with_state", "transition"):
            where = f"delta_rule/gradients/{label}"
            if left() < (2 if dry else 25):
                grads[label] = {"skipped": "step budget spent"}
                LOG(f"  delta_rule gradients {label}: skipped, {left():.0f} s left")
                continue
            try:
                if label == "packed_with_state":
                    leaves = [x.detach().clone() for x in (q, k, v, g_, beta, init)]
                else:
                    leaves = [x[:, s:e_].detach().clone() for x in (q, k, v, g_, beta)]
                ref_leaves = [x.double() for x in leaves]
                w_out = randn(1, T, Hv, dv, dtype=torch.float64)
                w_fin = None

                def loss_of(xs, double: bool):
                    nonlocal w_fin
                    if label == "packed_with_state":
                        q_, k_, v_, gg, b_, h0 = xs
                        if double:
                            out, fin = reference(q_, k_, v_, gg, b_, cu, h0)
                        else:
                            out, fin, _ = device_path(label, q_, k_, v_, gg, b_, whole, h0, True)
                        if w_fin is None:
                            w_fin = randn(*fin.shape, dtype=torch.float64)
                        return (out.double() * w_out).sum() + (fin.double() * w_fin).sum()
                    q_, k_, v_, gg, b_ = xs
                    vw = torch.cat([v_, v_.new_zeros(*v_.shape[:-1], dk)], dim=-1)
                    if double:
                        _, fin = reference(q_, k_, vw, gg, b_, None, start)
                    else:
                        fin = device_path(label, q_, k_, vw, gg, b_, seg, start, True)[1]
                    if w_fin is None:
                        w_fin = randn(*fin.shape, dtype=torch.float64)
                    return (fin.double() * w_fin).sum()

                for x in leaves + ref_leaves:
                    x.requires_grad_()
                loss_of(ref_leaves, True).backward()
                loss_of(leaves, False).backward()
                names = ["q", "k", "v", "g", "beta", "initial_state"][:len(leaves)]
                if label == "transition":  # only the final state is used: q gets no gradient (fla may give zeros)
                    names, leaves, ref_leaves = names[1:], leaves[1:], ref_leaves[1:]
                r = {n: _rel_err(a.grad if a.grad is not None else torch.zeros_like(a), b.grad)  # None: no gradient
                     for n, a, b in zip(names, leaves, ref_leaves)}
                r["rel_err"] = rnd(max(x["rel_err"] for x in r.values()))
                grads[label] = judge(where, r, "delta_rule_grad")
                LOG(f"  delta_rule gradients {label}: " + ", ".join(f"d{n} rel {r[n]['rel_err']:.3g}" for n in names)
                    + f" (tol {tol['delta_rule_grad']})")
            except StepTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                record_error(errors, where, e, prefix="cp_kernels ")
    finally:  # also after a timeout: what was checked so far
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        res["paths"] = {k_: sorted(v_) for k_, v_ in seen.items()}
        res["paths_as_expected"] = all(v_ == {res["expected_paths"][k_]} for k_, v_ in seen.items())
        res["within_tolerance"] = bool(flags) and all(flags.values())
        res["out_of_tolerance"] = sorted(k_ for k_, ok in flags.items() if not ok)
        LOG(f"  paths {res['paths']} (expected {res['expected_paths']}); within tolerance: {res['within_tolerance']}"
            + (f"; out of tolerance: {res['out_of_tolerance']}" if res["out_of_tolerance"] else ""))


def step_fit(res: dict, ctx: dict) -> None:
    import csv

    gpu = ctx["device"].type == "cuda"
    steps = 30 if gpu else 2
    root = Path(tempfile.mkdtemp(prefix="gpu_check_fit_", dir="/tmp"))
    override = root / "logger.yaml"
    override.write_text("trainer:\n  log_every_n_steps: 1\n  logger:\n"
                        "    - class_path: lightning.pytorch.loggers.CSVLogger\n"
                        f"      init_args:\n        save_dir: {root}\n        name: csv\n")
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--config", str(override), "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps)]
    cmd += (["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-true"] if gpu
            else ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"])
    res["command"] = " ".join(cmd)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    timeout = max(10.0, ctx["step_deadline"] - time.monotonic() - 5)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    res["seconds"] = rnd(time.perf_counter() - t0, 4)
    res["returncode"] = rc
    if ctx["out"]:
        (ctx["out"] / "fit.log").write_text(f"$ {res['command']}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    tail = (stdout + "\n" + stderr).strip().splitlines()[-25:]
    LOG("  fit output (tail):\n    " + "\n    ".join(tail))
    losses, tok_s = [], []
    for f in sorted(root.glob("csv/version_*/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    losses.append((int(row["step"]), float(row["train/loss"])))
                if row.get("train/tokens_per_s"):
                    tok_s.append(float(row["train/tokens_per_s"]))
    res["steps_logged"] = len(losses)
    res["first_loss"] = rnd(losses[0][1]) if losses else None
    res["last_losses"] = [rnd(v) for _, v in losses[-5:]]
    res["tokens_per_s_median_last10"] = rnd(sorted(tok_s[-10:])[len(tok_s[-10:]) // 2]) if tok_s else None
    res["tokens_per_s_max"] = rnd(max(tok_s)) if tok_s else None
    res["root_dir"] = str(root)
    if rc != 0:
        raise RuntimeError(f"cli.py fit exited with {rc}: " + " | ".join(tail[-5:]))
    if not losses or not tok_s:
        raise RuntimeError(f"cli.py fit logged no losses / tokens per second under {root}/csv")


def bench_config(dry: bool, layers: int):
    from transformers import Qwen3_5MoeConfig

    if dry:  # the same code on CPU: tiny shapes, the same 3 linear : 1 full pattern
        text = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32,
                    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                         mrope_section=[1, 1, 0], mrope_interleaved=True))
        layers = 4
    else:  # Qwen3.5-35B-A3B's text config (transformers' defaults are those) on fewer layers
        text = dict(vocab_size=248320, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                    linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                    shared_expert_intermediate_size=512,
                    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                         mrope_section=[11, 11, 10], mrope_interleaved=True))
    text.update(num_hidden_layers=layers, linear_conv_kernel_dim=4, max_position_embeddings=32768,
                router_aux_loss_coef=0.001,
                layer_types=[("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(layers)])
    v = text["vocab_size"]
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=64)  # text rows only: the tower is never run, keep it small
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=v - 4,
                            video_token_id=v - 3, vision_start_token_id=v - 2, vision_end_token_id=v - 1)


def row_lengths(total: int, seed: int = 0) -> list[int]:
    """bench_model's log-normal document lengths, the last document cut so the row holds exactly `total` tokens."""
    from bench_model import document_lengths

    out = []
    for n in document_lengths(total, seed):
        n = min(n, total - sum(out))
        if n > 0:
            out.append(n)
    return out


def active_parameters(model) -> dict:
    text = model.text_config
    total = active = embed = vision = routed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if "embed_tokens" in name:
            embed += n
        elif ".visual." in name or name.startswith("visual."):
            vision += n
        elif ".experts." in name and (name.endswith("gate_and_up_projs") or name.endswith("down_projs")):
            routed += n
            active += n * text.num_experts_per_tok / text.num_experts
        else:
            active += n
    return {"total": total, "active_non_embedding": int(active), "embedding": embed, "vision": vision,
            "routed_experts": routed}


def attention_flops(lengths: list[int], cfg) -> float:
    """Training FLOPs of the full-attention layers' QK^T and PV (causal: half of n^2), forward + backward (x3)."""
    text = cfg.text_config
    full = sum(t == "full_attention" for t in text.layer_types)
    return 3 * full * 2 * 2 * text.num_attention_heads * text.head_dim * sum(n * n / 2 for n in lengths)


def step_bench(res: dict, ctx: dict) -> None:
    import torch
    import transformers

    device, dry = ctx["device"], ctx["mode"] == "dry_run"
    errors = res.setdefault("errors", [])
    cfg = bench_config(dry, ctx["layers"])
    rows = ctx["rows"]
    warm, timed = (1, 2) if dry else (2, 3)
    res["config"] = {k: getattr(cfg.text_config, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
        "vocab_size", "layer_types")}
    res["dtype"] = "bf16"
    res["labels"] = "every token a target; native: training path (fused LM head + CE, return_logits=False)"
    res["timing"] = f"CUDA-synchronised wall time, {warm} warm-up + {timed} timed forward+backward steps, min"
    res["mfu_formula"] = ("6 * active_non_embedding_params * tokens / step_s / peak; peak = 989e12 (H100/H200 SXM "
                          "dense bf16 datasheet); mfu_vs_measured_matmul uses facts' bf16 matmul rate instead; "
                          "mfu_with_attention adds the full-attention layers' causal QK^T+PV FLOPs (x3)")
    res["peak_flops"] = PEAK_BF16_FLOPS
    res["memory"] = ("peak_memory_gib: torch.cuda.max_memory_allocated over the timed steps, static_memory_gib: "
                     "allocated before them (weights)" if device.type == "cuda" else
                     "CPU: peak_memory_gib is the process's max RSS so far, static_memory_gib its RSS before the steps")
    lengths = {n: row_lengths(n) for n in rows}
    res["rows"] = {str(n): {"documents": len(ls), "longest": max(ls), "padded_slots": len(ls) * max(ls)}
                   for n, ls in lengths.items()}
    g = torch.Generator().manual_seed(1)
    ids = {n: torch.randint(0, cfg.text_config.vocab_size - 8, (n,), generator=g) for n in rows}
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration as native_cls

    transformers_cls = getattr(transformers, native_cls.HF_ARCHITECTURE)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    native = native_cls.from_config(cfg, dtype=torch.bfloat16, device=device).train()
    res["build_native_s"] = rnd(time.perf_counter() - t0, 3)
    params = active_parameters(native)
    res["parameters"] = params
    n_active = params["active_non_embedding"]
    measured = ctx.get("matmul_flops")
    variants = res.setdefault("variants", {})

    def figures(name, n, t, lengths_, useful, extra=None):
        flops = 6 * n_active * useful
        f = {"tokens": useful, **t, "tokens_per_s": rnd(useful / t["min_s"]),
             "mfu": rnd(flops / t["min_s"] / PEAK_BF16_FLOPS, 4),
             "mfu_with_attention": rnd((flops + attention_flops(lengths_, cfg)) / t["min_s"] / PEAK_BF16_FLOPS, 4),
             "mfu_vs_measured_matmul": rnd(flops / t["min_s"] / measured, 4) if measured else None}
        f["peak_memory_gib"] = peak_memory_gib(device)
        f.update(extra or {})
        variants[f"{name}/{n}"] = f
        LOG(f"  {name:22s} {n:6d} tokens: {f['tokens_per_s']:10.0f} tok/s  step {t['min_s']:.4f} s (first "
            f"{t['first_call_s']:.2f} s)  MFU {f['mfu']:.3f}  peak {f.get('peak_memory_gib', '-')} GiB")
        return f

    def reset_peak():
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return memory_gib(device)

    def left() -> float:
        return ctx["step_deadline"] - time.monotonic()

    # --- native: the packed row with cu_seqlens (documents kept apart)
    native_ce = {}
    for n in rows:
        if left() < (5 if dry else 25):
            errors.append({"where": f"native/{n}", "error": "skipped: step budget spent"})
            continue
        ls = lengths[n]
        cu = torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=device)
        inp = dict(input_ids=ids[n][None].to(device), labels=ids[n][None].to(device), cu_seqlens=cu,
                   output_router_logits=True, return_logits=False)
        static = reset_peak()
        counts: Counter = Counter()

        def step():
            native.zero_grad(set_to_none=True)
            with SPY.watch():
                out = native(**inp)
                out.loss.backward()
            counts.update(SPY.counts)
            native_ce[n] = out.ce_loss.item()

        try:
            t, retried = with_fallbacks(lambda: time_steps(step, device, warm, timed, ctx["step_deadline"]), errors,
                                        f"native/{n}")
            figures("native_packed", n, t, ls, n, {"static_memory_gib": static, "ce": rnd(native_ce[n]),
                                                    "kernel_calls": dict(sorted(counts.items())),
                                                    "paths": paths_taken(counts),
                                                    **({"disabled_after_error": retried} if retried else {})})
        except StepTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            record_error(errors, f"native/{n}", e, once=True)
    res["paths"] = next((v["paths"] for k, v in variants.items() if k.startswith("native_packed")), None)

    # --- one profiled native step on the first row: where the time goes
    if left() > (5 if dry else 20):
        try:
            n = rows[0]
            ls = lengths[n]
            cu = torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=device)
            inp = dict(input_ids=ids[n][None].to(device), labels=ids[n][None].to(device), cu_seqlens=cu,
                       output_router_logits=True, return_logits=False)
            res["profile"] = profile_step(native, inp, device)
        except StepTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            record_error(errors, "profile", e, log=False)

    # --- transformers with the same weights (bf16; fla when installed), the native model freed first
    native.zero_grad(set_to_none=True)
    adapter = native.state_dict_adapter()
    hf_state = {}
    for k, v in native.state_dict().items():
        for hk, hv in adapter.convert_single_tensor_to_hf(k, v, in_memory=True):
            hf_state[hk] = hv
    t0 = time.perf_counter()
    with torch.device(device):
        hf = transformers_cls._from_config(copy.deepcopy(cfg), dtype=torch.bfloat16)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    res["build_transformers_s"] = rnd(time.perf_counter() - t0, 3)
    res["transformers_load"] = {"missing": list(missing)[:20], "unexpected": list(unexpected)[:20]}
    res["transformers_experts_implementation"] = str(getattr(hf.config, "_experts_implementation", None))
    res["transformers_attn_implementation"] = str(getattr(hf.config, "_attn_implementation", None))
    hf_state = native = adapter = None  # the closures above hold no other reference
    free_memory()
    hf.train()
    coef = cfg.text_config.router_aux_loss_coef
    hf_ce = {}

    def hf_variant(kind: str, n: int):
        ls = lengths[n]
        docs = list(torch.split(ids[n], ls))
        if kind == "packed_leaky":  # one sequence: the same work, documents leak into each other (speed only)
            batches = [dict(input_ids=ids[n][None], labels=ids[n][None])]
        else:  # padded: every document its own row; micro-batches of <= n padded slots when one batch would not fit
            vocab = cfg.text_config.vocab_size
            slots = len(ls) * max(ls)
            need = slots * vocab * 12  # bf16 logits + fp32 copy in the loss + their gradients, roughly
            free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else float("inf")
            groups = [list(range(len(ls)))] if need < 0.6 * free else _slot_groups(ls, n)
            batches = []
            for grp in groups:
                longest = max(ls[i] for i in grp)
                x = torch.zeros(len(grp), longest, dtype=torch.long)
                lab = torch.full_like(x, -100)
                mask = torch.zeros_like(x)
                for r, i in enumerate(grp):
                    x[r, :ls[i]] = docs[i]
                    lab[r, :ls[i]] = docs[i]
                    mask[r, :ls[i]] = 1
                batches.append(dict(input_ids=x, labels=lab, attention_mask=mask))
        batches = [to_device(b, device) for b in batches]
        static = reset_peak()

        def step():
            hf.zero_grad(set_to_none=True)
            ce_num = tok = 0.0
            for b in batches:
                out = hf(**b, output_router_logits=True, use_cache=False)
                out.loss.backward()
                k = int((b["labels"][:, 1:] != -100).sum())
                ce_num += (out.loss.item() - coef * out.aux_loss.item()) * k
                tok += k
            hf_ce[(kind, n)] = ce_num / tok

        t = time_steps(step, device, 1, 1 if dry else 2, ctx["step_deadline"])
        figures(f"transformers_{kind}", n, t, ls, n, {"static_memory_gib": static, "micro_batches": len(batches),
                                                      "slots": sum(b["input_ids"].numel() for b in batches),
                                                      "ce": rnd(hf_ce[(kind, n)])})

    order = [("padded", rows[0]), ("packed_leaky", rows[0])] + [(k, n) for n in rows[1:]
                                                                   for k in ("packed_leaky", "padded")]
    for kind, n in order:
        if left() < (5 if dry else 30):
            errors.append({"where": f"transformers_{kind}/{n}", "error": "skipped: step budget spent"})
            LOG(f"  ! transformers_{kind}/{n}: skipped, step budget spent")
            continue
        try:
            hf_variant(kind, n)
        except StepTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            record_error(errors, f"transformers_{kind}/{n}", e)
        free_memory()
    hf = None
    free_memory()
    summary = {}
    for n in rows:
        nat = variants.get(f"native_packed/{n}")
        if not nat:
            continue
        s = {"native_tokens_per_s": nat["tokens_per_s"], "native_mfu": nat["mfu"],
             "native_peak_memory_gib": nat.get("peak_memory_gib")}
        for kind in ("padded", "packed_leaky"):
            other = variants.get(f"transformers_{kind}/{n}")
            if other:
                s[f"speedup_vs_transformers_{kind}"] = rnd(nat["tokens_per_s"] / other["tokens_per_s"], 4)
                if kind == "padded":
                    s["ce_diff_native_packed_vs_transformers_padded"] = rnd(abs(nat["ce"] - other["ce"]))
        summary[str(n)] = s
    res["summary"] = summary


def _slot_groups(lengths: list[int], cap: int) -> list[list[int]]:
    """Consecutive documents into micro-batches whose padded size (rows x longest) stays <= cap."""
    groups, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > cap:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return groups + ([cur] if cur else [])


def profile_step(model, inp: dict, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model.zero_grad(set_to_none=True)
    with profile(activities=acts) as prof:
        out = model(**inp)
        out.loss.backward()
        sync(device)
    model.zero_grad(set_to_none=True)
    rows = []
    for e in prof.key_averages():
        dev_t = getattr(e, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(e, "self_cuda_time_total", 0)
        rows.append((dev_t if device.type == "cuda" else e.self_cpu_time_total, e.key, e.count))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1
    # each name to the first category whose marks it contains (kernel names on CUDA, aten ops on CPU)
    marks = {"fla_delta_rule": ("chunk_gated", "chunk_fwd", "chunk_bwd", "chunk_scaled_dot", "chunk_local_cumsum",
                                "gated_delta", "recompute_w_u", "solve_tril", "prepare_wy", "l2norm", "fla"),
             "causal_conv": ("causal_conv", "conv1d", "convolution", "conv_depthwise"),
             "attention": ("flash", "fmha", "attention", "sdpa", "varlen"),
             "grouped_gemm": ("grouped", "cutlass"), "other_gemm": ("gemm", "mm", "matmul", "sm90_xmma"),
             "cross_entropy": ("cross_entropy", "log_softmax", "nll_loss")}
    share = Counter()
    for t, name, _ in rows:
        low = name.lower()
        share[next((k for k, ms in marks.items() if any(m in low for m in ms)), "other")] += t
    return {"clock": "self CUDA time" if device.type == "cuda" else "self CPU time",
            "total_ms": rnd(total / 1e3, 5), "share_by_name": {k: rnd(v / total, 3) for k, v in share.most_common()},
            "top": [{"name": k[:160], "ms": rnd(t / 1e3, 4), "calls": c} for t, k, c in rows[:25]]}


def step_memory(res: dict, ctx: dict) -> None:
    """The planner's peak against the measured one for the same step on this device (see the module doc)."""
    from qmoe_lightning.plan.measure import measure_step
    from qmoe_lightning.plan.plan import plan_recipe
    from qmoe_lightning.plan.recipe import Recipe, model_config

    device, dry = ctx["device"], ctx["mode"] == "dry_run"
    spec = bench_config(dry, 4).text_config.to_dict()
    recipe = Recipe(path="gpu check", world_size=1, accelerator="cpu" if dry else "gpu",
                    precision="32-true" if dry else "bf16-true", strategy=None,
                    model={"pretrained": None, "model_config": spec, "text_only": True,
                           "activation_checkpointing": True, "lr": 1e-5},
                    max_tokens=512 if dry else 4096, pad_to_multiple_of=64, gradient_clip_val=1.0,
                    router_stats=False)
    plan = plan_recipe(recipe, skew=None, batch="synthetic", full_depth=True)
    planned = plan["peak_bytes_per_rank"][0]
    free_memory()
    with SPY.watch():
        measured = measure_step(recipe, model_config(recipe), device)["peak_bytes"]
        calls = SPY.snapshot()
    free_memory()
    res.update(tokens=recipe.max_tokens, precision=recipe.precision, planned_peak_bytes=planned,
               measured_peak_bytes=measured, measured_over_planned=rnd(measured / planned, 4),
               planned_by_category_bytes=plan["by_category_bytes"], plan_seconds=plan["seconds"],
               paths=paths_taken(calls))
    LOG(f"  planned {planned / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB "
        f"({measured / planned:.3f}); paths {res['paths']}")


def step_kernels(res: dict, ctx: dict) -> None:
    """Each kernel path alone at the benchmark's per-layer shapes (bf16): what the model picks vs the torch reference."""
    import torch
    import torch.nn.functional as F

    from qmoe_lightning.models import kernels, moe
    from qmoe_lightning.models.packing import build_sequence_info

    device, dry = ctx["device"], ctx["mode"] == "dry_run"
    cfg = bench_config(dry, ctx["layers"]).text_config
    n = ctx["rows"][-1]
    ls = row_lengths(n)
    cu = torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=device)
    info = build_sequence_info(1, n, device, cu)
    errors = res.setdefault("errors", [])
    res["tokens"], res["documents"] = n, len(ls)
    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(bf).requires_grad_()

    def measure(name, fns: dict, make_inputs):
        """fns: label -> f(*inputs) -> tensor; each timed forward+backward; max diff of each vs the first."""
        out = {}
        ref = None
        inputs = make_inputs()
        for label, fn in fns.items():
            try:
                def fb():
                    for x in inputs:
                        x.grad = None
                    y = fn(*inputs)
                    y.float().square().mean().backward()
                    return y

                with SPY.watch():
                    y = fn(*inputs).detach().float()
                    calls = SPY.snapshot()
                t = time_steps(fb, device, 1, 2 if dry else 5)
                out[label] = {"fwd_bwd_ms": rnd(t["min_s"] * 1e3, 4), "first_call_s": t["first_call_s"],
                              "calls": calls}
                if ref is None:
                    ref = y
                else:
                    out[label]["max_abs_diff_vs_" + next(iter(fns))] = rnd((y - ref).abs().max().item())
            except StepTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                record_error(errors, f"{name}/{label}", e, prefix="kernels ")
        res[name] = out
        LOG(f"  {name}: " + ", ".join(f"{k} {v['fwd_bwd_ms']} ms" for k, v in out.items()))

    Hk, Hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, \
        cfg.linear_value_head_dim
    conv_dim = 2 * Hk * dk + Hv * dv

    def delta_inputs():
        q, k = rand(1, n, Hk, dk), rand(1, n, Hk, dk)
        v = rand(1, n, Hv, dv)
        g_ = (-torch.rand(1, n, Hv, generator=g, device=device) * 0.5).requires_grad_()
        beta = torch.rand(1, n, Hv, generator=g, device=device).to(bf).requires_grad_()
        return [q, k, v, g_, beta]

    measure("delta_rule", {
        "torch_reference": lambda q, k, v, g_, b: kernels.chunk_gated_delta_rule_with_state(
            q, k, v, g_, b, info.chunk_layout(kernels.torch_delta_rule_chunk_size(q)))[0],
        "model_path": lambda q, k, v, g_, b: kernels.gated_delta_rule(q, k, v, g_, b, info),
    }, delta_inputs)

    conv = {"torch_reference": lambda x, w: kernels.causal_depthwise_conv_packed(x, w, cu),
            "model_path": lambda x, w: kernels.causal_conv1d_silu(x, w, info)}
    if ctx["fla_visible"] and device.type == "cuda":
        def fla_conv(x, w):
            from fla.modules.causal_conv1d import causal_conv1d

            return causal_conv1d(x, w, activation="silu", cu_seqlens=cu.long())[0]

        conv["fla_triton_cu_seqlens"] = fla_conv
    measure("causal_conv", conv, lambda: [rand(1, n, conv_dim), rand(conv_dim, cfg.linear_conv_kernel_dim, scale=0.3)])

    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def sdpa_per_doc(q, k, v):
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                               enable_gqa=Hq != Hkv) for s, e in info.doc_bounds]
        return torch.cat(outs, dim=2).transpose(1, 2)

    measure("attention", {"sdpa_per_document": sdpa_per_doc,
                          "model_path": lambda q, k, v: kernels.causal_attention(q, k, v, info, D ** -0.5)},
            lambda: [rand(1, Hq, n, D), rand(1, Hkv, n, D), rand(1, Hkv, n, D)])

    E, k_top, H, I = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    rows_ = n * k_top
    counts = torch.bincount(torch.randint(0, E, (rows_,), generator=g, device=device), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    fns = {"segment_mm_loop": lambda x, w: moe.segment_mm(x, w, offs)}
    x0, w0 = rand(rows_, H), rand(E, H, 2 * I, scale=0.02)
    if moe.grouped_mm_supported(x0, w0):
        fns["grouped_mm"] = lambda x, w: moe.grouped_mm(x, w, offs)
    measure("experts_gate_up", fns, lambda: [x0, w0])


# ------------------------------------------------------------------------------------------------------------- main
class Check:
    def __init__(self, args, out: Path | None, device, mode: str, fla_visible: bool):
        self.args, self.out = args, out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.ctx = {"device": device, "mode": mode, "fla_visible": fla_visible, "out": out, "layers": args.layers,
                    "rows": args.rows}
        self.report = {"schema": 1, "mode": mode, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "argv": sys.argv[1:], "budget_s": args.budget, "step_budgets_s": dict(BUDGETS),
                       "steps": {}, "failures": [], "warnings": []}
        self.budgets = {**BUDGETS, **args.step_budget}
        self.report["step_budgets_s"] = dict(self.budgets)
        spec = args.fail_step or os.environ.get("QMOE_GPU_CHECK_FAIL") or ""
        self.fail = dict((part.split(":") + ["raise"])[:2] for part in spec.split(",") if part)

    def write(self) -> None:
        self.report["total_seconds"] = rnd(time.monotonic() - self.t0, 4)
        if self.out is None:
            return
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def run(self, name: str, fn) -> None:
        res: dict = {}
        entry = {"status": "running", "result": res}
        self.report["steps"][name] = entry
        remaining = self.deadline - time.monotonic()
        if remaining < 3:
            entry.update(status="skipped", error="overall budget spent", seconds=0.0)
            self.report["failures"].append({"step": name, "error": "skipped: overall budget spent"})
            LOG(f"== {name}: skipped (overall budget spent)")
            self.write()
            return
        limit = min(self.budgets[name], remaining)
        self.ctx["step_deadline"] = time.monotonic() + limit
        LOG(f"== {name} (budget {limit:.0f} s)")
        t0 = time.perf_counter()

        def on_alarm(signum, frame):
            raise StepTimeout(f"step {name} ran past its budget of {limit:.0f} s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit + 2)  # +2: the step's own deadline checks come first
        try:
            if self.fail.get(name) == "hang":  # negative control of the time budget: the alarm must end it
                time.sleep(10**6)
            if self.fail.get(name) == "raise":
                raise RuntimeError(f"injected failure (--fail-step {name})")
            fn(res, self.ctx)
            entry["status"] = "ok"
        except BaseException as e:  # noqa: BLE001 - a failing step must not lose the others' figures
            if isinstance(e, KeyboardInterrupt):
                raise
            entry.update(status="timeout" if isinstance(e, StepTimeout) else "error",
                         error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-6000:])
            self.report["failures"].append({"step": name, "error": entry["error"]})
            LOG(f"  ! {name} {entry['status']}: {entry['error'][:500]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            entry["seconds"] = rnd(time.perf_counter() - t0, 4)
            for err in res.get("errors", []):
                self.report["failures"].append({"step": name, "where": err.get("where"), "error": err["error"]})
            if res.get("errors") and entry["status"] == "ok":
                entry["status"] = "partial"
            free_memory()
            self.write()
            LOG(f"   {name}: {entry['status']} in {entry['seconds']:.1f} s")


def summarise(report: dict) -> dict:
    steps = report["steps"]
    out = {}
    par = steps.get("parity", {}).get("result", {})
    out["parity"] = {k: {"max_abs_logit_diff": v.get("max_abs_logit_diff"), "within_tolerance": v.get("within_tolerance"),
                         "paths": v.get("paths")} for k, v in par.items() if isinstance(v, dict) and "cases" in v}
    fit = steps.get("fit", {}).get("result", {})
    cpk = steps.get("cp_kernels", {}).get("result", {})
    out["cp_kernels"] = {k: cpk.get(k) for k in ("within_tolerance", "out_of_tolerance", "paths", "paths_as_expected")}
    out["fit"] = {k: fit.get(k) for k in ("returncode", "tokens_per_s_median_last10", "first_loss", "last_losses")}
    bench = steps.get("bench", {}).get("result", {})
    out["bench"] = bench.get("summary")
    out["bench_paths"] = bench.get("paths")
    memory = steps.get("memory", {}).get("result", {})
    out["memory"] = {k: memory.get(k)
                     for k in ("planned_peak_bytes", "measured_peak_bytes", "measured_over_planned")}
    out["disabled_paths"] = list(report.get("disabled_paths", []))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: every code path, for CI")
    p.add_argument("--budget", type=float, default=420.0, help="overall seconds (steps have their own caps)")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps among {','.join(STEPS)}")
    p.add_argument("--fail-step", default=None,
                   help="negative controls: 'parity' raises at the start of that step, 'kernels:hang' hangs there "
                        "(the step's time budget must end it); comma-separated")
    p.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's time budget (repeatable)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 35B-A3B-shaped slice")
    p.add_argument("--threads", type=int, default=1, help="torch threads of a dry run (CPU)")
    p.add_argument("--rows", default=None, help="packed row lengths (default 4096,16384; dry run 1024,2048)")
    args = p.parse_args(argv)
    args.rows = [int(x) for x in (args.rows or ("1024,2048" if args.dry_run else "4096,16384")).split(",")]
    args.only = [s for s in args.only.split(",") if s]
    try:
        args.step_budget = {k: float(v) for k, v in (item.split("=", 1) for item in args.step_budget)}
    except ValueError:
        p.error("--step-budget takes STEP=SECONDS")
    unknown = set(args.step_budget) - set(STEPS)
    if unknown:
        p.error(f"--step-budget: unknown steps {sorted(unknown)}")
    unknown = set(args.only) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose among {STEPS}")
    return args


def main(argv=None) -> int:
    global LOG
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").unlink(missing_ok=True)
    LOG = Log(args.out / "gpu_check.log")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        LOG("no CUDA device: run with --dry-run on CPU")
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    if args.dry_run:  # one thread: a shared 2-core CI machine oversubscribed by OpenMP runs 10-100x slower
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fit subprocess too
    fla_visible = device.type == "cuda"
    if not fla_visible:
        # as tests/conftest.py: with fla + triton installed, transformers binds fla when its Qwen3.5 module is imported
        # and every CPU forward crashes; hide them before that import (the native model never imports them on CPU)
        for name in ("fla", "causal_conv1d"):
            sys.modules.setdefault(name, None)
    check = Check(args, args.out, device, "dry_run" if args.dry_run else "gpu", fla_visible)
    seen = set()

    def record_warning(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            check.report["warnings"].append({"warning": text[:1000], "where": f"{filename}:{lineno}"})
            LOG(f"  warning: {text[:300]}")

    warnings.showwarning = record_warning
    warnings.simplefilter("default")
    LOG(f"gpu check: mode {check.report['mode']}, device {device}, out {args.out}, budget {args.budget:.0f} s, steps "
        f"{args.only}")
    try:
        SPY.install()
    except Exception as e:  # noqa: BLE001
        check.report["failures"].append({"step": "spy", "error": f"{type(e).__name__}: {e}"})
    check.report["spy_not_found"] = SPY.not_found
    steps = {"facts": step_facts, "parity": step_parity, "cp_kernels": step_cp_kernels, "fit": step_fit,
             "bench": step_bench, "kernels": step_kernels, "memory": step_memory}
    for name in STEPS:
        if name in args.only:
            check.run(name, steps[name])
    check.report["disabled_paths"] = DISABLED
    check.report["summary"] = summarise(check.report)
    check.write()
    LOG(f"summary: {json.dumps(check.report['summary'], default=str)}")
    LOG(f"failures: {len(check.report['failures'])}; total {check.report['total_seconds']:.1f} s; "
        f"JSON: {args.out / 'gpu_check.json'}")
    LOG.file.close()
    return 1 if check.report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
