"""What lets the real model, parallel plan and optimizer run one training step on fake tensors over a fake process
group, with every index known: the planner's runtime.

Fake tensors (`FakeTensorMode`) carry shapes, dtypes and devices but no values, so ops whose OUTPUT SHAPE depends on
values (`bincount`, `nonzero`, `.tolist()` of split sizes, `repeat_interleave` without an output size) cannot run on
them. In a packed MoE step all such values are integers derived from the batch (`cu_seqlens`, labels) and from the
routing. FakeTensorMode propagates CONSTANTS: a fake tensor may carry a real value, and an op whose inputs are all
constants runs for real on them. So:
- the batch's integer tensors enter as constants (`constant`);
- integer factory ops (`arange`, `zeros`, `full`, ... of at most `CONSTANT_NUMEL_LIMIT` elements) run for real and
  return constants (`ConstantIndexFactories`), or `arange(T)` would make every derived index unknown;
- routing is forced (`forced_routing`): balanced round-robin, torchtitan's `_debug_force_load_balance` (the expert
  of pick j is j mod E), or skewed with one expert receiving twice its share; the indices are constants, the
  weights are still the differentiable gathered probabilities;
- a host read of a value computed from fake data (the clip's `coef < 1.0`) gets an assumed answer, recorded
  (`ScalarOracle`): the report lists every such assumption.

The fake process group (`dist.init_process_group("fake")`, torch's `FakeProcessGroup`) returns at once from every
collective with outputs of the right shape; its all-to-all copies the input, i.e. every rank is assumed to route
like this one (which is what balanced / forced routing says).

Footguns: these are torch internals (2.13): `CONSTANT_NUMEL_LIMIT` is a module global read at op time, constant
fake tensors must be made from REAL tensors (a constant made from a fake one crashes the next constant-propagating
op), and a factory must be known to be small and integer BEFORE it runs for real (a float factory would allocate the
fused CE's (V, H) buffer for real).
"""

from __future__ import annotations

import contextlib
import math
import traceback

import torch
import torch._subclasses.fake_tensor as fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
_INT_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool}
CONSTANT_LIMIT = 1 << 24  # elements of an integer tensor kept as a constant (routing of 1M token-picks fits)


@contextlib.contextmanager
def constant_propagation():
    """Raise FakeTensorMode's constant size limit (default 1 element) for the duration."""
    old = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = CONSTANT_LIMIT
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = old


def constant(mode: FakeTensorMode, real: torch.Tensor) -> FakeTensor:
    """A fake tensor of `mode` carrying `real`'s values (made from a REAL tensor: see the module doc)."""
    if isinstance(real, FakeTensor):
        raise TypeError("constant() needs a real tensor; build it under unset_fake_temporarily()")
    return mode.fake_tensor_converter.from_real_tensor(mode, real, make_constant=True)


class ConstantIndexFactories(TorchDispatchMode):
    """Integer / bool factory ops without tensor inputs and of at most CONSTANT_LIMIT elements run for real and
    return constants (above FakeTensorMode, which then sees constant inputs downstream)."""

    _FACTORIES = (aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor, aten.empty_strided)

    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode

    @staticmethod
    def _integer_numel(func, args, kwargs) -> int | None:
        """The element count of an integer / bool factory call, or None: decided before anything runs."""
        dtype = kwargs.get("dtype")
        packet = func.overloadpacket
        if packet is aten.arange:
            nums = [a for a in args if isinstance(a, (int, float))]
            if dtype is None:
                dtype = torch.int64 if all(isinstance(a, int) for a in nums) else torch.get_default_dtype()
            start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) > 2
                                                                       else 1)
            numel = max(math.ceil((end - start) / step), 0)
        else:
            if dtype is None and packet is aten.full and isinstance(args[1], (bool, int)):
                dtype = torch.bool if isinstance(args[1], bool) else torch.int64
            numel = 1 if packet is aten.scalar_tensor else math.prod(args[0])
        return numel if dtype in _INT_DTYPES else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func.overloadpacket in self._FACTORIES and torch.Tag.nondeterministic_seeded not in func.tags
                and not any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs)))):
            numel = self._integer_numel(func, args, kwargs)
            if numel is not None and numel <= CONSTANT_LIMIT:
                with unset_fake_temporarily():
                    real = func(*args, **{**kwargs, "device": torch.device("cpu")})
                    if func.overloadpacket in (aten.empty, aten.empty_strided):
                        real.zero_()
                return constant(self.mode, real)
        return func(*args, **kwargs)


class ScalarOracle(TorchDispatchMode):
    """A host read (`.item()`, `bool()`) of a fake value that is not a constant answers `value` instead of raising;
    the project-side call sites are recorded as the plan's assumptions."""

    def __init__(self, value=1):
        super().__init__()
        self.value = value
        self.sites: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor)
                and args[0].constant is None):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            if frames:
                self.sites.add(f"{frames[-1].filename.rsplit('/qmoe_lightning/', 1)[-1]}:{frames[-1].lineno} "
                               f"{frames[-1].line}")
            t = args[0]
            if t.dtype == torch.bool:
                return bool(self.value)
            return float(self.value) if t.is_floating_point() else int(self.value)
        return func(*args, **(kwargs or {}))


def forced_indices(num_tokens: int, num_experts: int, top_k: int, hot_factor: float = 1.0) -> torch.Tensor:
    """(N, k) expert indices, REAL: round-robin (every expert gets N k / E picks, each token k distinct experts when
    k <= E); with hot_factor h > 1, expert 0 receives h times its share, the picks taken from the other experts
    evenly (a token never picks one expert twice: the hot expert replaces one of its other picks; so at most every
    token picks it)."""
    picks = torch.arange(num_tokens * top_k) % num_experts
    indices = picks.reshape(num_tokens, top_k)
    if hot_factor > 1.0 and num_experts > 1:
        extra = int(round((hot_factor - 1.0) * num_tokens * top_k / num_experts))
        without = (indices != 0).all(dim=1).nonzero().flatten()[:extra]  # tokens not yet picking expert 0
        indices[without, -1] = 0
    return indices


@contextlib.contextmanager
def forced_routing(mode: FakeTensorMode, hot_factor: float = 1.0):
    """Every `TopKRouter` routes by `forced_indices` (constants) while inside; routing replay's bookkeeping (the
    activation-checkpointing recompute) keeps running on the forced indices."""
    from qmoe_lightning.models import moe

    original = moe.TopKRouter.forward

    def forward(self, x):
        logits = torch.nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        with _disable_current_modes():  # every mode: the factories above would make constants of these
            real = forced_indices(x.shape[0], self.weight.shape[0], self.top_k, hot_factor)
        indices = constant(mode, real) if isinstance(x, FakeTensor) else real.to(x.device)
        if self.replay is not None and self.replay.mode is not None:
            self.replay.indices(probs, self.top_k)  # the record (its memory) and replay bookkeeping, as in training
        weights = probs.gather(-1, indices)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), indices

    moe.TopKRouter.forward = forward
    try:
        yield
    finally:
        moe.TopKRouter.forward = original


class _GroupedMmShapes(torch.autograd.Function):
    """`torch._grouped_mm`'s outputs and saved tensors without its values: autograd keeps both operands for the
    backward, which returns one gradient of each operand's shape."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w)
        return x.new_empty(x.shape[0], w.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), None


@contextlib.contextmanager
def grouped_mm_shapes():
    """torch's fake `_grouped_mm` accepts bf16 only (its meta kernel checks the CUDA rule), while the CPU kernel
    also runs fp32: non-bf16 calls go to `_GroupedMmShapes` while inside."""
    original = torch._grouped_mm

    def grouped_mm(x, w, offs=None, **kwargs):
        if x.dtype == torch.bfloat16 or not isinstance(x, FakeTensor):
            return original(x, w, offs=offs, **kwargs)
        return _GroupedMmShapes.apply(x, w, offs)

    torch._grouped_mm = grouped_mm
    try:
        yield
    finally:
        torch._grouped_mm = original


class SymmetricCountExchange(TorchDispatchMode):
    """The fake group's all-to-all copies its input, so the experts' row counts "received from rank j" are the counts
    this rank sends TO j: right under balanced routing, wrong under skew. Here the count exchange (an integer
    all-to-all without split sizes) returns what every rank sends when it routes like this one: from each source, the
    counts this rank sends to itself. The rows' all-to-all then receives (and allocates) what a hot rank would."""

    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.c10d.alltoall_base_.default:
            output, inp, group, out_splits, in_splits = args[:5]
            if (isinstance(inp, FakeTensor) and inp.constant is not None and not inp.is_floating_point()
                    and not list(out_splits) and not list(in_splits)):
                if not isinstance(group, torch.distributed.ProcessGroup):
                    group = torch.distributed.ProcessGroup.unbox(group)
                with _disable_current_modes():
                    mine = inp.constant.chunk(group.size())[group.rank()]
                    real = torch.cat([mine] * group.size())
                output.copy_(constant(self.mode, real))
        return out
