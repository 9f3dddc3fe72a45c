"""Kernels against their readable references, and the per-call kernel choice."""

from __future__ import annotations

import pytest
import torch
from delta_rule_helpers import chunk_gated_delta_rule_packed
from tiny_configs import make_config

from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration, kernels
from qmoe_lightning.models.delta_rule import (
    causal_depthwise_conv_packed,
    chunk_gated_delta_rule_with_state,
    recurrent_gated_delta_rule_reference,
    unit_lower_solve,
)
from qmoe_lightning.models.lm_loss import linear_cross_entropy
from qmoe_lightning.models.moe import GroupedExperts, experts_loop_reference
from qmoe_lightning.models.packing import build_sequence_info


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("lengths", [[200], [1, 64, 65, 0, 129, 7], [63, 2, 130], [31, 33, 32, 97]])
def test_chunked_delta_rule_equals_recurrent_loop_per_document(lengths, chunk):
    torch.manual_seed(0)
    T = sum(lengths)
    q, k = torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8)
    v, g, beta = torch.randn(1, T, 4, 8), -torch.rand(1, T, 4) * 2, torch.rand(1, T, 4)
    info = build_sequence_info(1, T, q.device, cu(lengths))
    out = chunk_gated_delta_rule_packed(q, k, v, g, beta, info.chunk_layout(chunk))
    ref = recurrent_gated_delta_rule_reference(q, k, v, g, beta, cu(lengths))
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("chunk", [32, 64])
def test_chunked_delta_rule_gradients_equal_recurrent_loop(chunk):
    """The chunked path's backward (UT transform through the inverse, the scan) against autograd through the token
    loop, fp64, documents crossing chunk boundaries; negative control: one document's gradient leaking into the
    next is far off."""
    torch.manual_seed(3)
    lengths = [40, 1, 70, 33]
    T = sum(lengths)
    f64 = dict(dtype=torch.float64)
    leaves = [torch.randn(1, T, 2, 8, **f64), torch.randn(1, T, 2, 8, **f64), torch.randn(1, T, 4, 8, **f64),
              -torch.rand(1, T, 4, **f64) * 0.5, torch.rand(1, T, 4, **f64)]
    grad_out = torch.randn(1, T, 4, 8, **f64)
    info = build_sequence_info(1, T, leaves[0].device, cu(lengths))
    results = []
    for run in (lambda *a: chunk_gated_delta_rule_packed(*a, info.chunk_layout(chunk)),
                lambda *a: recurrent_gated_delta_rule_reference(*a, cu(lengths)),
                lambda *a: recurrent_gated_delta_rule_reference(*a, cu([T]))):  # negative control: one document
        xs = [x.clone().requires_grad_() for x in leaves]
        results.append(torch.autograd.grad(run(*xs), xs, grad_out))
    for a, b in zip(results[0], results[1]):
        assert (a - b).abs().max() < 1e-10
    assert max((a - c).abs().max() for a, c in zip(results[0], results[2])) > 1e-2


def test_unit_lower_solve_equals_triangular_solve_with_gradients():
    """X = A^-1 R for unit lower-triangular A: values and both gradients equal torch's triangular solve (fp64), the
    diagonal and upper part of A are never read (their gradient is zero), gradcheck passes."""
    torch.manual_seed(4)
    A = torch.randn(3, 2, 16, 16, dtype=torch.float64) * 0.3
    R = torch.randn(3, 2, 16, 5, dtype=torch.float64)
    G = torch.randn(3, 2, 16, 5, dtype=torch.float64)
    a1, r1 = A.clone().requires_grad_(), R.clone().requires_grad_()
    x1 = unit_lower_solve(a1, r1)
    d1 = torch.autograd.grad(x1, (a1, r1), G)
    a2, r2 = A.clone().requires_grad_(), R.clone().requires_grad_()
    x2 = torch.linalg.solve_triangular(a2, r2, upper=False, unitriangular=True)
    d2 = torch.autograd.grad(x2, (a2, r2), G)
    assert (x1 - x2).abs().max() < 1e-12
    assert all((p - q).abs().max() < 1e-12 for p, q in zip(d1, d2))
    assert torch.equal(d1[0].triu(), torch.zeros_like(A))
    garbage = A + torch.randn_like(A).triu()  # another diagonal and upper part: the same solve
    assert torch.equal(unit_lower_solve(garbage, R), unit_lower_solve(A, R))
    assert torch.autograd.gradcheck(unit_lower_solve, (A[:1, :1, :6, :6].clone().requires_grad_(),
                                                       R[:1, :1, :6].clone().requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_equals_conv1d_per_document_with_gradients(dtype):
    """The channels-last conv path against F.conv1d on each document alone (left-padded K-1), values and the
    gradients of input and weight."""
    torch.manual_seed(5)
    lengths = [5, 1, 9, 2, 13]
    D, K = 6, 4
    x = torch.randn(1, sum(lengths), D, dtype=dtype, requires_grad=True)
    w = torch.randn(D, K, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, sum(lengths), D, dtype=dtype)
    out = causal_depthwise_conv_packed(x, w, cu(lengths))
    got = torch.autograd.grad(out, (x, w), grad_out)
    bounds = cu(lengths).tolist()
    ref = torch.cat([torch.nn.functional.silu(torch.nn.functional.conv1d(
        x[:, s:e].transpose(1, 2), w.unsqueeze(1), padding=K - 1, groups=D)[..., : e - s]).transpose(1, 2)
        for s, e in zip(bounds[:-1], bounds[1:])], dim=1)
    want = torch.autograd.grad(ref, (x, w), grad_out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (out - ref).abs().max() < tol
    assert all((a - b).abs().max() < tol for a, b in zip(got, want))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows,chunk", [(300, 128), (300, 1024), (257, 64), (0, 64)])
def test_linear_cross_entropy_equals_logits_path_with_gradients(rows, chunk, dtype, tol):
    """The fused LM head + CE (buffers reused across chunks, chunks of equal size) against F.cross_entropy on the
    full logits: summed loss, hidden and weight gradients; rows without a target are left out."""
    torch.manual_seed(6)
    hidden = torch.randn(rows, 32).to(dtype)
    weight = (torch.randn(500, 32) * 0.2).to(dtype)
    targets = torch.randint(0, 500, (rows,))
    targets[::7] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h1, w1, targets, chunk)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h2, w2).float(), targets, ignore_index=-100,
                                            reduction="sum")
    ref.backward()
    scale = max(ref.abs().item(), 1.0)
    assert abs(loss.item() - ref.item()) <= 1e-6 * scale
    for got, want in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.numel():
            assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max().clamp_min(1e-6)
    with torch.no_grad():
        assert abs(linear_cross_entropy(hidden, weight, targets, chunk).item() - ref.item()) <= 1e-6 * scale


@pytest.mark.parametrize("lengths", [[200], [1, 64, 65, 0, 129, 7], [63, 2, 130]])
def test_chunked_delta_rule_from_given_states_returns_each_documents_final_state(lengths):
    """initial_state (per document) in, final states out (what context parallelism carries across ranks), in fp64
    against the token loop; an empty document's final state is its initial state. Negative control: ignoring the
    initial state is far off."""
    torch.manual_seed(2)
    T = sum(lengths)
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(1, T, 2, 8, **f64), torch.randn(1, T, 2, 8, **f64)
    v, g, beta = torch.randn(1, T, 4, 8, **f64), -torch.rand(1, T, 4, **f64) * 0.1, torch.rand(1, T, 4, **f64)
    init = torch.randn(len(lengths), 4, 8, 8, **f64)
    info = build_sequence_info(1, T, q.device, cu(lengths))
    out, final = chunk_gated_delta_rule_with_state(q, k, v, g, beta, info.chunk_layout(64), init, True)
    finals = []
    ref = recurrent_gated_delta_rule_reference(q, k, v, g, beta, cu(lengths), init, finals)
    assert (out - ref).abs().max() < 1e-12 and (final - torch.stack(finals)).abs().max() < 1e-12
    for d, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(final[d], init[d])
    zero_start = chunk_gated_delta_rule_with_state(q, k, v, g, beta, info.chunk_layout(64))[0]
    assert (zero_start - ref).abs().max() > 1e-2


def test_conv_never_reaches_into_previous_document():
    torch.manual_seed(1)
    lengths = [5, 1, 9, 2]
    x, w = torch.randn(1, sum(lengths), 6), torch.randn(6, 4)
    out = causal_depthwise_conv_packed(x, w, cu(lengths))
    bounds = cu(lengths).tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        alone = causal_depthwise_conv_packed(x[:, s:e], w, None)
        assert (out[:, s:e] - alone).abs().max() < 1e-6  # a leaked tap would be O(1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_grouped_experts_equal_loop_reference_with_gradients(dtype, tol):
    torch.manual_seed(2)
    E, H, I, N, K = 8, 32, 16, 50, 2
    experts = GroupedExperts(E, H, I).to(dtype)
    x = torch.randn(N, H, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[idx == 5] = 4  # expert 5 gets no token: empty groups must work
    idx[:, 1] = torch.where(idx[:, 0] == idx[:, 1], (idx[:, 1] + 1) % 5, idx[:, 1])
    w = torch.softmax(torch.randn(N, K), -1).to(dtype).requires_grad_()  # the routing weights' gradient too
    target = torch.randn(N, H, dtype=dtype)

    out = experts(x, idx, w)
    ref = experts_loop_reference(experts, x, idx, w)
    assert (out.float() - ref.float()).abs().max() <= tol
    grads = torch.autograd.grad((out * target).sum(), [x, w, experts.gate_and_up_projs, experts.down_projs])
    ref_grads = torch.autograd.grad((ref * target).sum(), [x, w, experts.gate_and_up_projs, experts.down_projs])
    for a, b in zip(grads, ref_grads):
        assert (a.float() - b.float()).abs().max() <= tol * max(1.0, b.float().abs().max().item())


def test_cpu_tensors_never_touch_gpu_kernels(monkeypatch):
    """fla / causal-conv1d importable (as on a GPU box) must not change CPU results or be called for them."""
    monkeypatch.setattr(kernels, "_has", lambda name: True)

    def boom():
        raise AssertionError("GPU kernel requested for CPU tensors")

    monkeypatch.setattr(kernels, "_fla_chunk_fn", boom)
    monkeypatch.setattr(kernels, "_causal_conv1d_fn", boom)
    torch.manual_seed(3)
    lengths = [40, 90]
    T = sum(lengths)
    info = build_sequence_info(1, T, torch.device("cpu"), cu(lengths))
    q, k, v = torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8)
    g, beta = -torch.rand(1, T, 2), torch.rand(1, T, 2)
    out = kernels.gated_delta_rule(q, k, v, g, beta, info)
    assert (out - recurrent_gated_delta_rule_reference(q, k, v, g, beta, cu(lengths))).abs().max() < 1e-5
    x, w = torch.randn(1, T, 6), torch.randn(6, 4)
    assert torch.equal(kernels.causal_conv1d_silu(x, w, info), causal_depthwise_conv_packed(x, w, cu(lengths)))


def test_packed_attention_is_per_document():
    torch.manual_seed(4)
    lengths = [7, 20, 3]
    T = sum(lengths)
    q, k, v = torch.randn(1, 4, T, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    info = build_sequence_info(1, T, q.device, cu(lengths))
    out = kernels.causal_attention(q, k, v, info, scale=8**-0.5)
    b = cu(lengths).tolist()
    for s, e in zip(b[:-1], b[1:]):
        alone = kernels.causal_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                         build_sequence_info(1, e - s, q.device), scale=8**-0.5)
        assert (out[:, s:e] - alone).abs().max() < 1e-6


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(5)
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config("base")).train()
    ids = torch.randint(0, 400, (1, 77))
    row = dict(input_ids=ids, labels=ids, cu_seqlens=cu([30, 47]), output_router_logits=True)
    model(**row).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.text_model.gradient_checkpointing = True
    model(**row).loss.backward()
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.allclose(p.grad, plain[n], atol=1e-7, rtol=1e-5), n


@pytest.mark.parametrize(
    "bad,match",
    [([0, 5, 3, 10], "non-decreasing"), ([1, 10], "from 0"), ([0, 9], "row length 10")],
)
def test_bad_cu_seqlens_are_rejected(bad, match):
    with pytest.raises(ValueError, match="cu_seqlens"):
        build_sequence_info(1, 10, torch.device("cpu"), torch.tensor(bad, dtype=torch.int32))


def test_bf16_default_dtype_keeps_expert_counts_exact():
    """Lightning's bf16-true makes bf16 the default dtype in forward; bf16 cannot count past 256 (257 -> 256)."""
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config("base"), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 400, (1, 2000))
    mask = torch.ones_like(ids)
    mask[0, 1900:] = 0
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
    finally:
        torch.set_default_dtype(old)
    cfg = model.text_config
    assert (out.expert_token_counts.sum(1) == 1900 * cfg.num_experts_per_tok).all()
    assert out.expert_token_counts.max() > 256 and torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_keeps_its_weight_gradient_in_the_weights_dtype(dtype):
    """What the fused CE holds from forward to backward: its (V, H) weight gradient in the weight's dtype (bf16-true:
    half the bytes of the fp32 accumulator), accumulated in fp32; with an upstream gradient of 1 the weight's gradient
    is that tensor exactly."""
    torch.manual_seed(7)
    hidden = torch.randn(96, 32).to(dtype).requires_grad_()
    weight = (torch.randn(500, 32) * 0.2).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (96,))
    loss = linear_cross_entropy(hidden, weight, targets, 32)
    saved_h, saved_w = loss.grad_fn.saved_tensors
    assert saved_w.dtype == dtype and saved_w.shape == weight.shape and saved_h.dtype == dtype
    kept = saved_w.clone()
    loss.backward()
    assert torch.equal(weight.grad, kept)
