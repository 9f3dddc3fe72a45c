"""Rank-local loading of a Hugging Face checkpoint into an already parallelised model, and the matching LoRA init.

Why: `checkpoint.load_hf_weights` fills a full, unsharded model; for a 35B MoE no rank can hold that. Here the
model is built on meta, parallelised (EP and/or FSDP2) and materialised with `to_empty`, and then every rank reads
from the safetensors files ONLY the part of each tensor it owns, straight into its local shard:

- what a rank owns comes from `state.global_state_dict(model)`: every entry is a DTensor of the GLOBAL
  (unparallelised) shape (FSDP2 parameters already are; EP expert slices are re-described as (E, ...) views), so
  `compute_local_shape_and_global_offset` gives this rank's box [offset, offset + local_shape) in native global
  coordinates. Dense FSDP parameters: Shard(0) on dp_shard = a block of rows. Experts: ep slice of dim 0, then
  efsdp chunk of that slice. Replicate dims read the same box on every replica; plain (unsharded) tensors are read
  whole. Writes go into `dtensor.to_local()` in place (shares storage with the parameter).
- the HF key -> native key / expert / columns / layout rules stay in the family's adapter (`MoeStateDictAdapter`; not repeated
  here). The adapter works on tensors, so it is given a META "probe" of the checkpoint tensor's full shape (from the
  safetensors header: no data read): it validates the HF shape (clear error naming the key) and returns its
  `Assignment`s. Its conversions are views (fused experts: transpose(1, 2) of (E, 2I, H) -> (E, H, 2I);
  per-expert: .t() of (I, H) -> (H, I) written at [e, :, cols]); the probe has distinct strides, so the returned
  view's strides say which HF dim each native dim comes from. The native box is mapped back through that
  permutation to an HF index box, `safe_open(...).get_slice(key)[box]` reads exactly those elements, and the same
  permutation turns them into the native chunk. A conversion that is not a pure dimension permutation (copy,
  narrow, reshape) is refused with an error rather than guessed.
- per-expert layouts (`experts.{e}.{gate,up,down}_proj.weight`): a key whose expert is outside this rank's box is
  not read at all; fused experts `(E, 2I, H)`: only rows [e0, e1) of dim 0; dense `(rows, ...)`: only this rank's
  rows. `get_tensor` is never called (a 0-d tensor, which cannot be sharded, is read whole).

Strictness is that of `load_hf_weights`: unexpected checkpoint keys, native tensors no key maps to, local boxes not
completely written (e.g. a missing expert), and shape disagreements are errors naming file and key; mtp / vision /
ignorable keys are skipped and counted, mtp keys recorded in `passthrough` for re-export. LoRA adapters (`lora_*`)
are not part of a base checkpoint and are left to `init_lora_parallel`; native-only state (the routers'
balancing bias) is not part of an HF checkpoint and is left as it is. The checks are local (every rank sees the
same key names, but only its own slices), so the outcome is agreed with ONE `all_gather_object` at the end: if any
rank failed, every rank raises the same error (a rank that passed never goes on into a collective that its peers
left: no hang). Not done: overlapping reads with compute, or reading a tensor once per node and scattering it
(each rank opens the files itself; with page cache and safetensors' mmap this reads each byte once per replica).

`init_lora_parallel(model, seed)`: LoRA adapters of a meta-built, parallelised model, equal bitwise to what
`apply_lora` produces on the full model with the same seed: the same RNG calls in the same order, i.e. each adapter
module's own `reset_lora_parameters()` runs on temporary FULL-shape tensors (on the parameter's device and dtype,
in model order), and each rank keeps its box. Costs one full adapter tensor at a time.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from qmoe_lightning.lora.apply import is_adapter_key, lora_modules
from qmoe_lightning.models.checkpoint import CheckpointScan, LoadReport
from qmoe_lightning.models.conversion import is_native_only_key

from .state import global_state_dict

Box = tuple[tuple[int, int], ...]  # per dim [start, stop) in native global coordinates


# ---------------------------------------------------------------------------------------------- rank-local boxes
@dataclass
class _Target:
    """One native state-dict entry: its global shape, this rank's box in it and the local tensor to write."""

    key: str
    shape: tuple[int, ...]  # global (unparallelised) shape
    box: Box  # this rank's [start, stop) per dim
    local: torch.Tensor  # this rank's storage (writes land in the model)
    seen: bool = False  # some checkpoint key maps to it
    written: dict = field(default_factory=dict)  # region (global box) -> elements written into the local box
    expert_written: Counter = field(default_factory=Counter)  # per-expert layout: expert -> elements written

    @property
    def local_numel(self) -> int:
        return math.prod(b - a for a, b in self.box)


def _target(key: str, value: torch.Tensor) -> _Target:
    if not isinstance(value, DTensor):
        return _Target(key, tuple(value.shape), tuple((0, n) for n in value.shape), value.detach())
    for p in value.placements:
        if not (isinstance(p, Replicate) or type(p) is Shard):
            raise NotImplementedError(f"{key}: placement {p} is not supported by rank-local loading (Shard / Replicate "
                                      "only)")
    shape = tuple(value.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, value.device_mesh, value.placements)
    local = value.to_local().detach()
    if tuple(local.shape) != tuple(local_shape):
        raise RuntimeError(f"{key}: local tensor {tuple(local.shape)} but its placements give {tuple(local_shape)}")
    return _Target(key, shape, tuple((o, o + n) for o, n in zip(offset, local_shape)), local)


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(x0 >= x1 for x0, x1 in out) else out


# ---------------------------------------------------------------------------------------------- adapter probe
def _probe(shape: tuple[int, ...]) -> torch.Tensor:
    """Meta tensor of `shape` whose strides (1, 2, 3, ... from the last dim) identify its dims in any view."""
    n = len(shape)
    return torch.empty_strided(shape, tuple(n - d for d in range(n)), device="meta")


def _source_dims(view: torch.Tensor, probe: torch.Tensor, where: str) -> list[int]:
    """For each dim of `view` (the adapter's output for `probe`), the probe (HF) dim it is."""
    strides = list(probe.stride())
    ok = (view is probe or view._base is probe) and view.storage_offset() == 0 and view.dim() == probe.dim() \
        and sorted(view.stride()) == sorted(strides)
    dims = [strides.index(s) for s in view.stride()] if ok else []
    if not ok or [probe.shape[d] for d in dims] != list(view.shape):
        raise NotImplementedError(f"{where}: the state-dict adapter's conversion is not a permutation of the "
                                  "checkpoint tensor's dims; rank-local loading cannot slice it")
    return dims


# ---------------------------------------------------------------------------------------------- loading
@torch.no_grad()
def _load_local(model: nn.Module, path: Path, stats: dict, mtp_missing_ok: bool = False) -> LoadReport:
    adapter = model.state_dict_adapter()
    targets = {k: _target(k, v) for k, v in global_state_dict(model).items()
               if not is_adapter_key(k) and not is_native_only_key(k)}
    if adapter.tied:
        targets.pop("lm_head.weight", None)
    scan = CheckpointScan()
    for file, f, key in scan.keys(path, adapter, targets):
        stats["checkpoint_elements"] += _load_key(f, file, key, adapter, targets, stats)
    missing = []
    for key, t in targets.items():
        done = sum(t.written.values())
        if not t.seen:
            missing.append(key)
        elif done < t.local_numel:
            missing.append(f"{key} ({_describe_gap(t)})")
    # the model's own class name, also under FSDP2's subclass
    scan.check(path, model.hf_architecture(), missing, mtp_missing_ok)
    return scan.report(len(targets))


def _load_key(f, file: Path, key: str, adapter, targets: dict[str, _Target], stats: dict) -> int:
    """Read this rank's part of checkpoint tensor `key` into its targets. Returns the tensor's full numel."""
    reader = f.get_slice(key)
    hf_shape = tuple(reader.get_shape())
    probe = _probe(hf_shape)
    try:
        assignments = adapter.convert_single_tensor_from_hf(key, probe)
    except ValueError as err:
        raise ValueError(f"{file.name}: {err}") from None
    for a in assignments:
        t = targets.get(a.native_key)
        if t is None:
            raise ValueError(f"{file.name}: {key!r} -> {a.native_key!r}, which the model does not have")
        t.seen = True
        src_dims = _source_dims(a.tensor, probe, f"{file.name}: {key!r}")
        # the assignment's region in native global coordinates; native dim nd <- a.tensor dim (nd - lead)
        if a.expert is None:  # the whole native tensor
            lead, expected = 0, t.shape
            region = tuple((0, n) for n in t.shape)
        else:  # [expert, ..., cols] of the native tensor (per-expert layouts)
            c0, c1, step = (a.cols or slice(None)).indices(t.shape[-1])
            lead, expected = 1, (t.shape[1:-1] + (c1 - c0,) if 0 <= a.expert < t.shape[0] and step == 1 else None)
            region = ((a.expert, a.expert + 1), *((0, n) for n in t.shape[1:-1]), (c0, c1))
        if expected is None or tuple(a.tensor.shape) != tuple(expected):
            want = f"an expert index < {t.shape[0]}" if expected is None else f"shape {tuple(expected)}"
            raise ValueError(f"{file.name}: {key!r} -> {a.slot} has shape {tuple(a.tensor.shape)}, the model expects "
                             f"{want}; config and weights disagree")
        inter = _intersect(region, t.box)
        if region not in t.written:  # the same key twice (two shards) is not counted twice
            t.written[region] = 0 if inter is None else math.prod(b - a_ for a_, b in inter)
            if lead:
                t.expert_written[a.expert] += t.written[region]
        if inter is None:
            continue  # not this rank's: nothing is read (per-expert keys of other ranks' experts)
        index = [slice(None)] * len(hf_shape)
        for j, hf_dim in enumerate(src_dims):
            (r0, _), (i0, i1) = region[j + lead], inter[j + lead]
            index[hf_dim] = slice(i0 - r0, i1 - r0)
        # the HF box, permuted to native dim order (a 0-d tensor cannot be sharded: read whole)
        chunk = (reader[tuple(index)] if index else f.get_tensor(key)).permute(src_dims)
        dest = t.local[tuple(slice(i0 - b0, i1 - b0) for (i0, i1), (b0, _) in zip(inter, t.box))]
        if lead:
            dest = dest[0]
        if tuple(dest.shape) != tuple(chunk.shape):  # cannot happen if the boxes are right; never copy silently
            raise RuntimeError(f"{file.name}: {key!r}: read {tuple(chunk.shape)} for a local box {tuple(dest.shape)}")
        dest.copy_(chunk)
        stats["read_elements"] += chunk.numel()
    return math.prod(hf_shape)


def _describe_gap(t: _Target) -> str:
    """What of this rank's box was not written: the experts (per-expert layout) or an element count."""
    if t.expert_written:
        per_expert = t.local_numel // max(t.box[0][1] - t.box[0][0], 1)
        gaps = [e for e in range(*t.box[0]) if t.expert_written.get(e, 0) < per_expert]
        if gaps:
            return f"{len(gaps)} expert slice(s) of this rank's experts {list(range(*t.box[0]))}: {gaps[:16]}"
    return f"{t.local_numel - sum(t.written.values())} of this rank's {t.local_numel} elements not written"


def load_hf_weights_parallel(model: nn.Module, path: str | Path,
                             group: dist.ProcessGroup | None = None, mtp_missing_ok: bool = False) -> LoadReport:
    """Fill a parallelised, materialised model from the HF checkpoint directory `path`, each rank reading only its
    own slices (see module doc). Strict; raises the same error on every rank of `group` (default: world) if any
    rank's part does not match. Returns `load_hf_weights`' report with `rank_local` = {"read_elements",
    "checkpoint_elements"} (what this rank read, of the loaded tensors' total)."""
    path = Path(path)
    stats = Counter(read_elements=0, checkpoint_elements=0)
    report, error, exc = None, None, None
    try:
        report = _load_local(model, path, stats, mtp_missing_ok)
    except Exception as err:  # anything: peers must learn about it instead of waiting in a collective
        error, exc = f"{type(err).__name__}: {err}", err
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        errors: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
    else:
        errors = [error]
    failed = {}
    for rank, e in enumerate(errors):
        if e is not None:
            failed.setdefault(e, []).append(rank)
    if failed:
        text = "\n".join(f"[rank(s) {ranks}] {e}" for e, ranks in failed.items())
        raise ValueError(f"rank-local loading of {path} failed:\n{text}") from exc
    report.rank_local = dict(stats)
    return report


# ---------------------------------------------------------------------------------------------- MTP init
@torch.no_grad()
def init_mtp_parallel(model: nn.Module, seed: int) -> int:
    """Random-initialise the MTP module of a parallelised, materialised model (its checkpoint had no `mtp.*`) so that
    each rank's local part equals its slice of `model.init_weights(model.mtp)` on the full model under `seed`: the
    module's init runs on an unparallelised copy with full tensors, each rank keeps its box. (Seeding every rank and
    initialising the shards in place would give every shard the same values: duplicated experts.)"""
    views = global_state_dict(model)
    local_any = next(iter(views.values()))
    device = local_any.to_local().device if isinstance(local_any, DTensor) else local_any.device
    full = model.mtp.unparallelised_copy()
    dtype = next(p.dtype for p in model.mtp.parameters())
    full.to(dtype).to_empty(device=device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model.init_weights(full)
    n = 0
    for name, tensor in full.state_dict().items():
        t = _target(f"mtp.{name}", views[f"mtp.{name}"])
        t.local.copy_(tensor[tuple(slice(a, b) for a, b in t.box)])
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- LoRA init
@torch.no_grad()
def init_lora_parallel(model: nn.Module, seed: int | None) -> int:
    """Initialise every LoRA adapter of a parallelised, materialised model so that each rank's local part equals its
    slice of `apply_lora(full_model, cfg)` with `cfg.init_seed = seed` (see module doc). Returns the adapters set."""
    views = global_state_dict(model)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    n = 0
    with torch.random.fork_rng(devices=[torch.device("cuda", i) for i in cuda], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)  # as apply_lora: every module's init draws from this stream in model order
        for name, module in lora_modules(model).items():
            names = [p for p, v in module._parameters.items() if v is not None and is_adapter_key(p)]
            targets = {p: _target(f"{name}.{p}", views[f"{name}.{p}"]) for p in names}
            full = {p: nn.Parameter(torch.empty(t.shape, dtype=t.local.dtype, device=t.local.device),
                                    requires_grad=False) for p, t in targets.items()}
            saved = {p: module._parameters[p] for p in names}
            try:
                module._parameters.update(full)  # the module's own init rule on the full tensors
                module.reset_lora_parameters()
            finally:
                module._parameters.update(saved)
            for p, t in targets.items():
                t.local.copy_(full[p][tuple(slice(a, b) for a, b in t.box)])
                n += 1
    return n
