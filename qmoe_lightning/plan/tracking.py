"""What the planner counts during its fake step: live tensor bytes by category (torch's memory trackers, adapted)
and the bytes of every collective.

Memory: torch's `MemTracker` / `FSDPMemTracker` (`torch.distributed._tools`) follow every tensor storage created
inside them (a dispatch mode with weak references, so a storage counts until it is freed) and label it: parameters
(sharded, and all-gathered while an FSDP unit is unsharded), gradients, optimizer state, activations (forward and
recompute), temporaries (backward), FSDP's all-gather outputs and reduce-scatter inputs, the step's inputs. The
peak is the largest total of one moment and its breakdown at that moment. Two adaptations:
- `GroupedUnitsTracker`: torch 2.13's FSDPMemTracker replaces each FSDP state's forward hooks by per-module hooks
  on every module of a unit; our bf16 Gated DeltaNet units group several sibling modules (`fully_shard([...])`,
  parallelize._shard_mixed_dtypes), which would then reshard after their first member. Kept as FSDP2 registers
  them (group hooks) instead.
- the fused LM head + CE's own buffers (its chunk of logits, the gradients it computes in forward and keeps for
  backward) get a category of their own (`FUSED_CE`), counted while `lm_loss._LinearCrossEntropy.forward` runs.

Collectives: `CollectiveBytes` records every c10d call with its bytes on this rank; all-to-all as the rows this rank
sends (the sum of its input splits) and the part that leaves the rank.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _SavedFSDPMethods
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_state import _register_group_forward_hooks
from torch.utils._python_dispatch import TorchDispatchMode

c10d = torch.ops.c10d
FUSED_CE = "Fused CE"

# tracker label -> the planner's category
CATEGORY = {
    _FSDPRefType.SHARDED_PARAM: "parameters", _FSDPRefType.UNSHARDED_PARAM: "parameters",
    _FSDPRefType.BUFFER: "parameters", _MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "parameters",
    _FSDPRefType.SHARDED_GRAD: "gradients", _FSDPRefType.UNSHARDED_GRAD: "gradients", _MemRefType.GRAD: "gradients",
    _FSDPRefType.OPT: "optimizer_state", _MemRefType.OPT: "optimizer_state",
    _FSDPRefType.ACT: "activations", _FSDPRefType.TEMP: "activations", _FSDPRefType.INP: "activations",
    _MemRefType.ACT: "activations", _MemRefType.TEMP: "activations", _MemRefType.OTH: "activations",
    _FSDPRefType.ALL_GATHER: "communication_buffers", _FSDPRefType.REDUCE_SCATTER: "communication_buffers",
    FUSED_CE: "fused_ce_buffers",
}
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "communication_buffers",
              "fused_ce_buffers")


class _FusedCeLabel:
    """Mixin: storages created while the fused CE's forward runs are labelled FUSED_CE."""

    _in_fused_ce = 0

    def _track(self, reftype, t):
        if self._in_fused_ce and reftype in (_FSDPRefType.ACT, _FSDPRefType.TEMP, _MemRefType.ACT,
                                             _MemRefType.TEMP):
            reftype = FUSED_CE
        return super()._track(reftype, t)

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None):
        snap = self._curr_mem_snap.setdefault(winfo.device, dict.fromkeys(self._ref_class, 0))
        snap.setdefault(FUSED_CE, 0)
        return super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)

    @contextlib.contextmanager
    def labelling_fused_ce(self):
        from qmoe_lightning.models import lm_loss

        fn = lm_loss._LinearCrossEntropy
        original = fn.forward
        tracker = self

        def forward(ctx, *args):
            tracker._in_fused_ce += 1
            try:
                return original(ctx, *args)
            finally:
                tracker._in_fused_ce -= 1

        fn.forward = staticmethod(forward)
        try:
            yield
        finally:
            fn.forward = staticmethod(original)

    def _update_peak_stats(self, peak_state) -> None:
        # the global peak only: torch's also walks every module's statistics at every op (most of a plan's time),
        # which nothing here reads
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap["Total"]:
                self._peak_mem[device] = snap["Total"]
                self._peak_mem_snap[device] = dict(snap)

    def peak_by_category(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for snap in self.get_tracker_snapshot("peak").values():
            for label, nbytes in snap.items():
                if label in CATEGORY:
                    out[CATEGORY[label]] += nbytes
        return out


class PlainTracker(_FusedCeLabel, MemTracker):
    """A model without FSDP (one process). torch 2.13's MemTracker registers a gradient hook on every parameter,
    which raises for a frozen one (LoRA's base): here a frozen parameter is switched to requires_grad for the
    registration only (counted as a parameter as before; no gradient ever reaches its hook)."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True) -> tuple[int, int]:
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)  # for the hook's registration only: no gradient ever reaches a frozen parameter
        try:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        finally:
            for p in frozen:
                p.requires_grad_(False)


class GroupedUnitsTracker(_FusedCeLabel, FSDPMemTracker):
    """FSDPMemTracker that keeps FSDP2's group forward hooks of multi-module units (see the module doc)."""

    def _states(self):
        seen, out = set(), []
        for module in self._root_mod.modules():
            if isinstance(module, FSDPModule):
                state = module._get_fsdp_state()
                if id(state) not in seen and state._fsdp_param_group is not None:
                    seen.add(id(state))
                    out.append(state)
        return out

    @staticmethod
    def _register(state, pre, post) -> None:
        modules = state._modules
        if len(modules) == 1:
            state._pre_forward_hook_handle = modules[0].register_forward_pre_hook(pre, prepend=True,
                                                                                  with_kwargs=True)
            state._post_forward_hook_handle = modules[0].register_forward_hook(post, prepend=False, always_call=True)
        else:
            handle = _register_group_forward_hooks(modules, pre, post, state._modules_to_run_forward,
                                                   state._cast_output_dtype)
            state._pre_forward_hook_handle = state._post_forward_hook_handle = handle

    @staticmethod
    def _remove_hooks(state) -> None:
        state._pre_forward_hook_handle.remove()
        if state._post_forward_hook_handle is not state._pre_forward_hook_handle:
            state._post_forward_hook_handle.remove()

    def _instrument_fsdp_module(self) -> None:
        self._group_states = self._states()
        for state in self._group_states:
            self._remove_hooks(state)
            key, group = state._modules[0], state._fsdp_param_group
            self._instrument_fsdp_sharded_params_grads(group)
            self._register(state, self._fsdp_state_pre_forward(key, state._pre_forward),
                           self._fsdp_state_post_forward(key, state._post_forward))
            self._fsdp_mod_to_saved_methods[key] = _SavedFSDPMethods(group.pre_backward, group.post_backward)
            group.pre_backward = self._fsdp_param_group_pre_backward(key, group.pre_backward)
            group.post_backward = self._fsdp_param_group_post_backward(key, group.post_backward)
        for buffer in self._root_mod.buffers():
            self._update_and_maybe_create_winfos(buffer, _FSDPRefType.BUFFER)

    def _deregister_module_and_optimizer_hooks(self) -> None:
        for state in self._group_states:
            self._remove_hooks(state)
            self._register(state, state._pre_forward, state._post_forward)
            saved = self._fsdp_mod_to_saved_methods[state._modules[0]]
            state._fsdp_param_group.pre_backward = saved.pre_backward
            state._fsdp_param_group.post_backward = saved.post_backward
        self._fsdp_mod_to_saved_methods.clear()
        if self._optimizer_hook_handles is not None:
            for handle in self._optimizer_hook_handles:
                handle.remove()
            self._optimizer_hook_handles = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CollectiveBytes(TorchDispatchMode):
    """Every c10d collective issued inside, with its bytes on this rank: {kind: [calls, bytes, off-rank bytes,
    received bytes]} (all-to-all: bytes sent, the part of them that leaves the rank, bytes received)."""

    def __init__(self):
        super().__init__()
        self.stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is c10d.alltoall_base_.default:
            out, inp, group, out_splits, in_splits = args[:5]
            if not isinstance(group, dist.ProcessGroup):
                group = dist.ProcessGroup.unbox(group)
            row = _nbytes(inp) // max(inp.shape[0], 1)
            in_splits = list(in_splits) or [inp.shape[0] // group.size()] * group.size()
            s = self.stats["all_to_all" if inp.is_floating_point() else "all_to_all_counts"]
            s[0] += 1
            s[1] += sum(in_splits) * row
            s[2] += (sum(in_splits) - in_splits[group.rank()]) * row
            s[3] += _nbytes(out)
        elif func is c10d._allgather_base_.default:
            s = self.stats["all_gather"]
            s[0] += 1
            s[1] += _nbytes(args[0])
        elif func is c10d._reduce_scatter_base_.default:
            s = self.stats["reduce_scatter"]
            s[0] += 1
            s[1] += _nbytes(args[1])
        elif func is c10d.allreduce_.default:
            s = self.stats["all_reduce"]
            s[0] += 1
            s[1] += sum(_nbytes(t) for t in args[0])
        elif func.namespace in ("c10d", "_c10d_functional"):
            self.stats[str(func.overloadpacket)][0] += 1
        return func(*args, **kwargs)
