"""bf16-mixed (`torch.autocast(dtype=torch.bfloat16)`, Lightning's `precision: bf16-mixed`) through the model's own
kernels, on CPU:

- model level, both families on a packed row with images (Qwen3.5-MoE with its MTP layer): forward + backward under
  autocast is finite, every gradient has its parameter's dtype (fp32), and it is close to the fp32 run within the
  bf16 tolerances below. The fp32 run replays the autocast run's expert choices (`RoutingReplay`): a bf16 router
  may rank two nearly tied experts the other way, a discrete change of the computation rather than a rounding
  error, and it would make any tolerance either loose or flaky;
- every custom autograd Function under autocast: forward and backward run (the delta rule's UT transform stopped at
  the first backward, "expected m1 and m2 to have the same dtype": float != BFloat16; the grouped experts stopped in
  forward once their rows were bf16), gradients come back in the inputs' dtypes, and each computes in the precision
  its module doc says: the gated delta rule in fp32 (bitwise what it computes without autocast), the grouped expert
  GEMMs and the fused LM head + CE in bf16 (as autocast runs a linear layer);
- the expert-parallel dispatch (both all-to-all paths) and the context-parallel gather on a one-process gloo group.

Tolerances (bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ~ 3.9e-3). A gradient passes through some ten
bf16-rounded matmul operands in forward and backward, so its error is a few u, up to ~10 u where errors add up:
- loss: |bf16 - fp32| <= LOSS_RTOL = 1e-3 relative (seen <= 2.3e-5 over 3 seeds: the CE is an fp32 mean over ~100
  tokens of fp32 log-softmaxes, which averages the bf16 logit rounding away);
- every gradient tensor: max |bf16 - fp32| <= GRAD_TOL = 0.1 of its scale, the largest |fp32 gradient| of the tensor
  floored at 1e-2 of the model's largest (seen <= 0.049, the Gated DeltaNet projections and conv of Qwen3.5; a
  tensor whose gradient nearly cancels has only rounding noise left, as in tiny_configs.assert_gradients_match);
- all gradients together: ||bf16 - fp32|| / ||fp32|| <= GLOBAL_TOL = 0.05 (seen <= 0.021).
A gradient bug (a missing factor, a dropped term, a gradient in the wrong place) moves a tensor by >= its own
scale, 10x these bounds; the negative control scales one tensor by 1.25 and must be caught.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import make_config, make_vl_moe_config, pack, vision_doc

from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from qmoe_lightning.models.decoder import DecoderBlock
from qmoe_lightning.models.delta_rule import chunk_gated_delta_rule_with_state, unit_lower_solve
from qmoe_lightning.models.lm_loss import linear_cross_entropy
from qmoe_lightning.models.moe import GroupedExperts
from qmoe_lightning.models.packing import build_sequence_info

BF16 = torch.bfloat16
LOSS_RTOL = 1e-3
GRAD_TOL = 0.1
GRAD_FLOOR = 1e-2
GLOBAL_TOL = 0.05

FAMILIES = {
    "qwen3_5_moe": (Qwen3_5MoeForConditionalGeneration, make_config, dict(mtp_layers=1)),
    "qwen3_vl_moe": (Qwen3VLMoeForConditionalGeneration, make_vl_moe_config, {}),
}


def autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the shapes are tiny, and two OpenMP threads on a shared 2-core machine wait on each other
    (a step of the tiny model took ~50x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _packed_row() -> dict:
    """Three documents in one row: two with an image each, one text only; labels on every token."""
    docs = [vision_doc([5, ("image", (1, 4, 4)), 20], seed=1), vision_doc([30], seed=2),
            vision_doc([3, ("image", (1, 4, 8)), 9], seed=3)]
    row = pack(docs)
    row["labels"] = row["input_ids"].clone()
    return row


def _routing(model, phase: int, caches: dict):
    """Record (phase 0) or replay (phase 1) the expert choices of every MoE block, the MTP block's included."""
    stack = contextlib.ExitStack()
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock) and m.is_moe]
    for i, block in enumerate(blocks):
        stack.enter_context(block.routing_replay.phases(caches.setdefault(i, []))[phase])
    return stack


def _gradient_errors(grads: dict, reference: dict) -> tuple[dict[str, float], float]:
    """Per tensor max |g - ref| over its scale (module doc), and the global relative error."""
    largest = max(g.abs().max() for g in reference.values())
    per = {n: ((grads[n] - g).abs().max() / torch.maximum(g.abs().max(), GRAD_FLOOR * largest)).item()
           for n, g in reference.items()}
    num = sum(((grads[n] - g) ** 2).sum() for n, g in reference.items())
    den = sum((g ** 2).sum() for g in reference.values())
    return per, (num / den).sqrt().item()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_runs(request):
    """(family, model, mtp in play, autocast (loss, grads), fp32 (loss, grads)) on the packed row."""
    cls, make, kwargs = FAMILIES[request.param]
    torch.manual_seed(0)
    model = cls.from_config(make(), **kwargs).train()
    with torch.no_grad():  # norms off their initial value, so that the norms are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    row = _packed_row()
    caches: dict = {}
    with _routing(model, 0, caches), autocast():
        out = model(**row, return_logits=False)
    out.loss.backward()
    mixed = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    mtp = out.mtp is not None
    model.zero_grad(set_to_none=True)
    with _routing(model, 1, caches):
        out = model(**row, return_logits=False)
    out.loss.backward()
    full = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return request.param, model, mtp, mixed, full


def test_model_under_autocast_is_finite_and_close_to_fp32(family_runs):
    family, model, mtp, (loss, grads), (loss32, grads32) = family_runs
    assert mtp == (family == "qwen3_5_moe")  # the MTP layer is in play for Qwen3.5
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # autocast did run in bf16 (otherwise this would compare fp32 with itself) ...
    assert loss != loss32
    # ... and within bf16 rounding of fp32
    assert abs(loss - loss32) <= LOSS_RTOL * loss32.abs(), (loss.item(), loss32.item())
    for name, p in model.named_parameters():
        g = grads[name]
        assert g is not None and g.dtype == p.dtype == torch.float32, name
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
    per, overall = _gradient_errors(grads, grads32)
    worst = max(per, key=per.get)
    assert per[worst] <= GRAD_TOL, f"{worst}: {per[worst]:.3g} of its scale"
    assert overall <= GLOBAL_TOL, overall


def test_negative_control_the_gradient_tolerance_catches_a_scaled_tensor(family_runs):
    """One tensor's gradient 1.25x (a scaling bug far smaller than the usual 2x) must fail the per-tensor check."""
    _, _, _, (_, grads), (_, grads32) = family_runs
    largest = max(grads32, key=lambda n: grads32[n].abs().max())
    bad = dict(grads, **{largest: grads[largest] * 1.25})
    per, _ = _gradient_errors(bad, grads32)
    assert per[largest] > GRAD_TOL


# ---------------------------------------------------------------------------------------- the custom Functions


def test_unit_lower_solve_takes_mixed_dtypes_and_gives_each_input_its_own():
    """The UT transform's solve: fp32 A with a bf16 right-hand side, under autocast, with a bf16 upstream gradient
    (what autocast's bf16 matmuls around it produced): computed in fp32, gradients in each input's dtype."""
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(3, 8, 8, generator=g) * 0.3).requires_grad_()
    R = torch.randn(3, 8, 5, generator=g).to(BF16).requires_grad_()
    with autocast():
        X = unit_lower_solve(A, R)
    assert X.dtype == torch.float32
    X.to(BF16).square().sum().backward()
    assert A.grad.dtype == torch.float32 and R.grad.dtype == BF16
    assert torch.isfinite(A.grad).all() and torch.isfinite(R.grad).all()
    # the same values as autograd through an fp32 triangular solve
    A2, R2 = A.detach().clone().requires_grad_(), R.detach().float().requires_grad_()
    unit = A2.tril(-1) + torch.eye(8)
    X2 = torch.linalg.solve_triangular(unit, R2, upper=False, unitriangular=True)
    torch.testing.assert_close(X, X2, rtol=1e-5, atol=1e-5)
    X2.to(BF16).square().sum().backward()
    torch.testing.assert_close(A.grad, A2.grad.tril(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(R.grad, R2.grad.to(BF16))


def _delta_rule_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    T, Hk, Hv, dk, dv = 70, 2, 4, 16, 16
    q, k = (torch.randn(1, T, Hk, dk, generator=g) for _ in range(2))
    v = torch.randn(1, T, Hv, dv, generator=g)
    decay = -torch.rand(1, T, Hv, generator=g) * 0.5
    beta = torch.rand(1, T, Hv, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)] + [decay.requires_grad_(), beta.requires_grad_()]


def test_delta_rule_under_autocast_runs_in_fp32_and_backward_runs():
    """bf16 q / k / v (the autocast projections' outputs) with fp32 decay / beta: the same output and gradients as
    without autocast, bitwise (autocast is off inside: the state and the UT transform stay fp32), in bf16 / fp32 as
    the inputs. Two documents, one spanning several chunks (the carried state is exercised)."""
    info = build_sequence_info(1, 70, torch.device("cpu"), torch.tensor([0, 45, 70], dtype=torch.int32), None, None,
                               None)
    layout = info.chunk_layout(16)
    results = []
    for use_autocast in (True, False):
        inputs = _delta_rule_inputs(BF16)
        with autocast() if use_autocast else contextlib.nullcontext():
            out, final = chunk_gated_delta_rule_with_state(*inputs, layout, output_final_state=True)
        (out.float().square().sum() + final.square().sum()).backward()
        assert out.dtype == BF16 and final.dtype == torch.float32
        assert [t.grad.dtype for t in inputs] == [BF16, BF16, BF16, torch.float32, torch.float32]
        results.append((out, final, [t.grad for t in inputs]))
    (out_a, final_a, grads_a), (out_b, final_b, grads_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(final_a, final_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def _experts(lora: bool):
    torch.manual_seed(2)
    experts = GroupedExperts(8, 64, 32)
    if lora:
        from qmoe_lightning.lora.experts import LoRAGroupedExperts

        experts = LoRAGroupedExperts(experts, rank=4, alpha=8, dtype=torch.float32)
        with torch.no_grad():  # B starts at zero: give the adapter a value, so that it counts
            for _, B in experts.adapter_pairs().values():
                B.normal_(std=0.1)
    return experts


def _route(n: int = 40):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 64, generator=g)
    indices = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, 2, generator=g), -1)
    return x, indices, weights


@pytest.mark.parametrize("lora", [False, True], ids=["experts", "lora_experts"])
@pytest.mark.parametrize("rows_dtype", [torch.float32, BF16], ids=["fp32_rows", "bf16_rows"])
def test_grouped_experts_under_autocast_compute_in_bf16(lora, rows_dtype):
    """fp32 experts (and fp32 LoRA adapters) under autocast, fed fp32 rows (the residual stream) or bf16 rows (the
    MTP block's, after its autocast `fc`): exactly the bf16 computation (rows, experts and adapters rounded to bf16,
    the module run without autocast), the output in the rows' dtype, every gradient in its parameter's dtype."""
    experts = _experts(lora)
    x, indices, weights = _route()
    x = x.to(rows_dtype).requires_grad_()
    with autocast():
        out = experts(x, indices, weights.to(BF16))
    assert out.dtype == rows_dtype
    out.float().square().sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert x.grad.dtype == rows_dtype

    reference = _experts(lora).to(BF16)
    expected = reference(x.detach().to(BF16), indices, weights.to(BF16))
    assert torch.equal(out, expected.to(rows_dtype))


def test_fused_lm_head_cross_entropy_under_autocast_is_the_plain_path_under_autocast():
    """The fused head + CE under autocast == `F.cross_entropy(F.linear(h, W).float())` under autocast (bf16 logits,
    fp32 softmax), not the fp32 result; gradients in fp32 (the parameter's and the hidden states' dtype)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(50, 64, generator=g).requires_grad_()
    W = (torch.randn(300, 64, generator=g) * 0.2).requires_grad_()
    t = torch.randint(0, 300, (50,), generator=g)
    t[::7] = -100
    with autocast():
        fused = linear_cross_entropy(h, W, t, chunk_size=16)
        plain = F.cross_entropy(F.linear(h, W).float(), t, ignore_index=-100, reduction="sum")
    full = F.cross_entropy(F.linear(h, W), t, ignore_index=-100, reduction="sum")
    # bf16 logits move the loss by ~1e-4 of itself (seen 1.1e-4); the fused and plain paths differ in summation order
    # only (seen: bitwise equal)
    assert abs(plain - full) > 1e-5 * full
    assert abs(fused - plain) <= 1e-6 * plain, (fused.item(), plain.item(), full.item())
    grad_h, grad_w = torch.autograd.grad(fused, (h, W))
    ref_h, ref_w = torch.autograd.grad(plain, (h, W))
    assert grad_h.dtype == grad_w.dtype == torch.float32
    # the plain path sums the weight gradient in one bf16 GEMM and rounds it to bf16 (autograd of the bf16 copy), the
    # fused one sums the chunks' products in fp32: elements where +-1-sized terms cancel differ by a few bf16 ulps
    # of the terms, so the bound is relative to the tensor's largest element
    for got, ref in ((grad_h, ref_h), (grad_w, ref_w)):
        assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.fixture
def one_process_group():
    import torch.distributed as dist
    from test_parallel_common import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_expert_parallel_dispatch_under_autocast(one_process_group, overlap):
    """The all-to-all dispatch (bf16 rows, `_StartExchange` / `_FinishExchange` when overlapped with the shared
    expert) under autocast: the local dispatcher's results bitwise, gradients in the parameters' dtypes."""
    from qmoe_lightning.parallel.expert_parallel import shard_experts_

    x, indices, weights = _route()
    results = []
    for parallel in (False, True):
        experts = _experts(lora=True)
        if parallel:
            shard_experts_(experts, one_process_group, overlap=overlap)
        xi = x.clone().requires_grad_()
        shared = torch.nn.Linear(64, 64)

        def alongside():
            return shared(xi)

        with autocast():
            out, side = experts(xi, indices, weights.to(BF16), alongside=alongside)
        (out.square().sum() + side.float().square().sum()).backward()
        grads = {n: p.grad for n, p in experts.named_parameters()}
        assert all(g.dtype == torch.float32 for g in grads.values()) and xi.grad.dtype == torch.float32
        results.append((out, grads, xi.grad))
    (out_a, grads_a, gx_a), (out_b, grads_b, gx_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_context_parallel_gather_and_zero_tie_under_autocast(one_process_group):
    """The cp all-gather (its backward sums in fp32 and hands back the input's dtype) and the zero tie (fp32 zero,
    zero gradients of each input's dtype) with bf16 and fp32 inputs under autocast."""
    from qmoe_lightning.models.context_parallel import zero_tie
    from qmoe_lightning.parallel.context_parallel import ContextParallelGroup

    comm = ContextParallelGroup(one_process_group)
    a = torch.randn(4, 3).to(BF16).requires_grad_()
    b = torch.randn(4, 3).requires_grad_()
    with autocast():
        gathered = comm.all_gather(a, dim=0)
        tie = zero_tie(a, b)
    assert gathered.dtype == BF16 and tie.dtype == torch.float32
    (gathered.float().sum() + tie).backward()
    assert a.grad.dtype == BF16 and b.grad.dtype == torch.float32
    assert torch.equal(a.grad, torch.ones_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_fsdp2_shards_a_bf16_true_model_that_keeps_fp32_decay_parameters(one_process_group):
    """bf16-true under FSDP2 (the ep / cp strategy): the Gated DeltaNet keeps A_log / dt_bias in fp32 beside bf16
    weights, and FSDP2 refuses a unit whose trainable parameters mix dtypes ("FSDP expects uniform original parameter
    dtype"); `parallelize_model` gives such a module a unit of its own. Forward + backward run, the fp32 parameters
    stay fp32 and get fp32 gradients, every gradient finite."""
    from torch.distributed.tensor import DTensor

    from qmoe_lightning.parallel.parallelize import build_mesh, parallelize_model

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config()).to(BF16).train()
    assert model.model.language_model.layers[0].linear_attn.A_log.dtype == torch.float32  # kept by KeepFp32Mixin
    parallelize_model(model, build_mesh("cpu", 1, 1))
    row = _packed_row()
    model(**row, return_logits=False).loss.backward()
    dtypes = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        assert grad is not None and torch.isfinite(grad.float()).all(), name
        dtypes.setdefault(grad.dtype, []).append(name)
        assert grad.dtype == p.dtype, name
    assert set(dtypes) == {BF16, torch.float32}
    assert all(n.endswith(("A_log", "dt_bias")) for n in dtypes[torch.float32])


def test_fsdp2_reshards_a_bf16_true_gated_deltanet_unit_after_its_forward(one_process_group, monkeypatch):
    """Its projections and conv form one FSDP2 unit beside the fp32 A_log / dt_bias unit; every module of the unit is
    called in the forward (the conv taps too), so the unit reshards right after the Gated DeltaNet instead of staying
    gathered until the end of the model's forward. Negative control: the conv weight read without calling the module
    (the old code) leaves the unit gathered."""
    from torch.distributed.fsdp import FSDPModule

    from qmoe_lightning.models.gated_deltanet import ConvTaps
    from qmoe_lightning.parallel.parallelize import build_mesh, parallelize_model

    def unit_gathered_after_its_layer() -> bool:
        torch.manual_seed(0)
        model = Qwen3_5MoeForConditionalGeneration.from_config(make_config()).to(BF16).train()
        parallelize_model(model, build_mesh("cpu", 1, 1))
        layer = model.model.language_model.layers[0]
        proj = layer.linear_attn.in_proj_qkv
        assert isinstance(proj, FSDPModule)  # the projections' unit, apart from the fp32 decay parameters
        group = proj._get_fsdp_state()._fsdp_param_group
        seen = []
        layer.register_forward_hook(lambda *_: seen.append(group.is_unsharded))
        model(**_packed_row(), return_logits=False)
        return seen[0]

    assert not unit_gathered_after_its_layer()
    monkeypatch.setattr(ConvTaps, "__call__", lambda self: self.weight.squeeze(1))  # no module call, no hooks
    assert unit_gathered_after_its_layer()
