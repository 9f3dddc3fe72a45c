"""Context parallelism at the model level: one packed row split over cp = 2 and 4 gloo processes gives the whole
row's logits, losses, aux loss, expert counts and gradients (summed over the ranks) of the same model on one rank.

Rows: text, image and video documents of lengths that are not multiples of 64 or of cp, a document spanning a whole
slice (the state chain passes through a rank), documents starting inside the conv halo, tail padding. Every family
(Qwen3.5-MoE with MTP; Qwen3-VL-MoE with deepstack; the text-only Qwen3-MoE, and Qwen3-Next with MTP, on the same
lengths as text documents). Negative controls: without the carried delta-rule state, or without the conv halo, the
split row is measurably wrong.
"""

from __future__ import annotations

import pytest
import torch
from test_parallel_common import run_workers
from tiny_configs import make_config, make_qwen3_next_config, make_vl_moe_config, pack, vision_doc

pytestmark = pytest.mark.multiprocess

TOL = 2e-5

DOCS = [
    [5, ("image", (1, 4, 6)), 60],
    [131],
    [3, ("image", (1, 4, 4)), 11, ("image", (1, 6, 8)), 14],
    [1],
    [45],
    [2, ("video", (2, 4, 4)), 9],
    [9],
]


# the same document lengths as text only (a text-only family's row)
TEXT_DOCS = [[66], [131], [31], [1], [45], [20], [9]]


def _row(tail_padding: int = 0, order=None, text_only: bool = False):
    docs = [vision_doc(p, seed=40 + i) for i, p in enumerate(TEXT_DOCS if text_only else DOCS)]
    if order is not None:
        docs = [docs[i] for i in order]
    row = pack(docs)
    labels = row["input_ids"].clone()
    labels[row["mm_token_type_ids"] != 0] = -100
    if tail_padding:  # the DataModule's tail: one more "document" of padding, attention_mask 0, no targets
        T = row["input_ids"].shape[1]
        row["input_ids"] = torch.cat([row["input_ids"], torch.zeros(1, tail_padding, dtype=torch.long)], 1)
        row["mm_token_type_ids"] = torch.cat([row["mm_token_type_ids"],
                                              torch.zeros(1, tail_padding, dtype=torch.long)], 1)
        labels = torch.cat([labels, torch.full((1, tail_padding), -100)], 1)
        row["cu_seqlens"] = torch.cat([row["cu_seqlens"], torch.tensor([T + tail_padding], dtype=torch.int32)])
        row["attention_mask"] = torch.cat([torch.ones(1, T, dtype=torch.long),
                                           torch.zeros(1, tail_padding, dtype=torch.long)], 1)
    row["labels"] = labels
    return row


def _cp_context(group):
    """The model's ParallelContext with every row split over `group` (nothing else parallelised)."""
    from qmoe_lightning.models.parallel_context import ParallelContext
    from qmoe_lightning.parallel.context_parallel import ContextParallelRows

    return ParallelContext(rows=ContextParallelRows(group))


def _model(family: str):
    from qmoe_lightning.models import (Qwen3_5MoeForConditionalGeneration, Qwen3MoeForCausalLM,
                                       Qwen3NextForCausalLM, Qwen3VLMoeForConditionalGeneration)

    torch.manual_seed(3)
    if family == "qwen3_5_moe":
        model = Qwen3_5MoeForConditionalGeneration(make_config("base"), mtp_layers=1)
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        # a dense layer and top-k without renormalisation: the paths this family adds
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            mlp_only_layers=[1], norm_topk_prob=False, router_aux_loss_coef=0.001,
            rope_parameters=dict(rope_type="default", rope_theta=1e4)))
    elif family == "qwen3_next":
        # grouped Gated DeltaNet projections, gated attention over a partial rotary, a dense layer, a shared expert
        model = Qwen3NextForCausalLM(make_qwen3_next_config("base"), mtp_layers=1)
    else:
        model = Qwen3VLMoeForConditionalGeneration(make_vl_moe_config("base"))
    with torch.no_grad():  # norms off their initial values, the routers spread out
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.float()


def _run(model, row):
    model.zero_grad(set_to_none=True)
    out = model(**row, output_router_logits=True)
    mtp = out.mtp.ce.sum() if out.mtp is not None else torch.zeros(())
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(logits=out.logits.detach(), loss=out.loss.detach(), ce=out.ce_loss.detach(),
                aux=out.aux_loss.detach(), counts=out.expert_token_counts, mtp=mtp.detach(),
                n=out.num_label_tokens, row_n=out.row_label_tokens, grads=grads)


def _worker(rank, world, family, tail_padding, order, control):
    import torch.distributed as dist

    from qmoe_lightning.models import context_parallel as cp_model
    from qmoe_lightning.parallel.context_parallel import ContextParallelGroup

    torch.manual_seed(0)
    model = _model(family)
    if control == "frozen_inputs":  # the first Gated DeltaNet's q / k / v need no gradient, its decay still does
        for name, p in model.named_parameters():
            if any(key in name for key in ("embed_tokens", "in_proj_qkv", "visual", "layers.0.input_layernorm",
                                           "layers.0.linear_attn.conv1d")):
                p.requires_grad_(False)
    row = _row(tail_padding, order, text_only=model.TEXT_ONLY)
    whole = _run(model, row)

    if control == "no_state":
        cp_model.ContextSlice.carries_in = lambda self, r: False
    elif control == "no_halo":
        real = cp_model.conv_with_halo

        def zero_halo(x, weight, info, conv):
            tails = info.cp.comm.all_gather(x[:, -(weight.shape[-1] - 1):] * 0, dim=1)  # same collectives
            halo = weight.shape[-1] - 1
            before = tails[:, :halo]
            return conv(torch.cat([before, x], 1), weight, info.cp.halo_window(halo, x.device))[:, halo:]

        cp_model.conv_with_halo = zero_halo
        assert real is not None
    model.parallel = _cp_context(ContextParallelGroup(None))
    split = _run(model, row)
    for g in split["grads"].values():
        dist.all_reduce(g)
    logits = [torch.empty_like(split["logits"]) for _ in range(world)]
    dist.all_gather(logits, split["logits"].contiguous())
    counts = split["counts"].clone()
    dist.all_reduce(counts)
    ce, n, mtp = split["ce"].clone(), split["n"].clone(), split["mtp"].clone()
    for t in (ce, n, mtp):
        dist.all_reduce(t)
    T = row["input_ids"].shape[1]
    return dict(whole=whole, logits=torch.cat(logits, 1)[:, :T], counts=counts, ce=ce, n=n, mtp=mtp,
                aux=split["aux"], row_n=split["row_n"], grads=split["grads"] if rank == 0 else None,
                local_len=split["logits"].shape[1])


def _grad_error(grads, ref) -> float:
    largest = max(g.abs().max() for g in ref.values())
    worst = 0.0
    assert set(grads) == set(ref)
    for name, g in grads.items():
        scale = torch.maximum(ref[name].abs().max(), 1e-3 * largest)
        worst = max(worst, float((g - ref[name]).abs().max() / scale))
    return worst


# row lengths 334 (cp 2: two slices of 167), 339 and 339 (padded to the split); the cp 4 reordered row has a
# document starting 2 tokens before a slice boundary (inside the next rank's conv halo), and in every row a document
# spans at least one whole slice (the state passes through a rank)
CASES = [
    ("qwen3_5_moe", 2, 0, None),
    ("qwen3_5_moe", 4, 5, None),
    ("qwen3_5_moe", 4, 0, [0, 1, 3, 4, 2, 5, 6]),
    ("qwen3_vl_moe", 2, 5, [2, 0, 1, 3, 4, 5, 6]),
    ("qwen3_moe", 4, 5, [0, 1, 3, 4, 2, 5, 6]),
    ("qwen3_next", 4, 5, [0, 1, 3, 4, 2, 5, 6]),
]


@pytest.mark.parametrize("family,cp,tail,order", CASES,
                         ids=["qwen35_cp2", "qwen35_cp4_tail_padding", "qwen35_cp4_reordered", "qwen3vl_cp2",
                              "qwen3moe_cp4_tail_padding", "qwen3next_cp4_tail_padding"])
def test_split_row_equals_whole_row(tmp_path, family, cp, tail, order):
    results = run_workers(_worker, cp, tmp_path, family, tail, order, None, timeout=300)
    r0 = results[0]
    whole = r0["whole"]
    T = whole["logits"].shape[1]
    assert T % 64
    assert r0["local_len"] * cp >= T
    for r in results:  # every rank reports the row's aux and target count
        assert abs(float(r["aux"] - whole["aux"])) <= TOL * max(1.0, float(whole["aux"]))
        assert int(r["row_n"]) == int(whole["n"])
    assert (r0["logits"] - whole["logits"]).abs().max() <= 1e-4
    assert torch.equal(r0["counts"], whole["counts"])
    assert int(r0["n"]) == int(whole["n"])
    assert abs(float(r0["ce"] - whole["ce"])) <= TOL
    assert abs(float(r0["mtp"] - whole["mtp"])) <= TOL
    assert _grad_error(r0["grads"], whole["grads"]) <= 1e-4


@pytest.mark.parametrize("control", ["no_state", "no_halo"])
def test_negative_controls_break_the_split(tmp_path, control):
    """Dropping what crosses the slice boundary must show: the test above would catch a broken exchange."""
    results = run_workers(_worker, 2, tmp_path, "qwen3_5_moe", 0, None, control, timeout=300)
    r0 = results[0]
    assert (r0["logits"] - r0["whole"]["logits"]).abs().max() > 1e-3


def test_split_row_with_frozen_inputs_of_the_first_layer(tmp_path):
    """Frozen embeddings and q/k/v projections (the first Gated DeltaNet's q, k, v need no gradient, its decay
    does): every rank's state carry must still take part in the gathers' backward the same way (a rank whose carry
    needs no gradient while another's does would leave a backward collective unpaired: a hang)."""
    results = run_workers(_worker, 4, tmp_path, "qwen3_5_moe", 0, [0, 1, 3, 4, 2, 5, 6], "frozen_inputs",
                          timeout=300)
    r0 = results[0]
    assert not any("in_proj_qkv" in n for n in r0["whole"]["grads"])
    assert (r0["logits"] - r0["whole"]["logits"]).abs().max() <= 1e-4
    # the embeddings' gradient (the largest) is gone, so the scale floor drops 10x: the decay parameters' nearly
    # cancelling gradients (~5e-5, fp32 noise ~1.5e-8 absolute) reach 3e-4 of their scale; a bug is O(1)
    assert _grad_error(r0["grads"], r0["whole"]["grads"]) <= 1e-3


def test_zero_tie_is_zero_whatever_its_inputs():
    """The tie that keeps every rank in the gathers' backward: exactly 0 even for inf / NaN inputs (an fp16 sum of a
    long slice overflows: `x.sum() * 0` was NaN), a gradient exactly when an input needs one, zero gradients."""
    from qmoe_lightning.models.context_parallel import zero_tie

    x = torch.tensor([float("inf"), 1.0, float("nan")], requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float16)
    tie = zero_tie(x, y)
    assert tie.item() == 0.0 and tie.requires_grad and tie.dtype == torch.float32
    (tie * 3).backward()
    assert torch.equal(x.grad, torch.zeros(3))
    assert not zero_tie(y).requires_grad


def _mismatch_worker(rank, world, kind):
    from qmoe_lightning.parallel.context_parallel import ContextParallelGroup

    model = _model("qwen3_5_moe")
    model.parallel = _cp_context(ContextParallelGroup(None))
    row = _row(0, None if rank == 0 else [1, 0, 2, 3, 4, 5, 6])  # rank 1: the same documents in another order
    if kind == "left_padding":
        row = _row(0, None)
        del row["cu_seqlens"]
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        row["attention_mask"][:, :3] = 0
    try:
        model(**row)
    except (RuntimeError, ValueError) as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", ["different_rows", "left_padding"])
def test_split_refuses_rows_it_cannot_split_exactly(tmp_path, kind):
    messages = run_workers(_mismatch_worker, 2, tmp_path, kind, timeout=300)
    want = "hold different rows" if kind == "different_rows" else "needs cu_seqlens"
    assert all(m is not None and want in m for m in messages), messages
