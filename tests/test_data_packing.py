"""Pack planning (first-fit-decreasing for evaluation, random-order first fit re-planned per epoch for training)
and the packed rows the DataModule produces."""

from __future__ import annotations

import random

import pytest

from data_modules import EpochPackPlan, MultimodalPackingDataModule, plan_packs
from data_modules.encoding import IGNORE
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def _naive_ffd(lengths, cap):
    return _naive_first_fit(lengths, cap, sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))


def test_ffd_matches_textbook_and_respects_capacity():
    rng = random.Random(0)
    lengths = [min(300, max(1, int(rng.lognormvariate(3.5, 1.0)))) for _ in range(800)]
    packs = plan_packs(lengths, 300)
    assert packs == _naive_ffd(lengths, 300)
    assert sorted(i for p in packs for i in p) == list(range(800))
    assert all(sum(lengths[i] for i in p) <= 300 for p in packs)
    assert plan_packs([], 10) == []
    with pytest.raises(ValueError, match="longer than max_tokens"):
        plan_packs([11], 10)


def _naive_first_fit(lengths, cap, order, window=None):
    """Textbook first fit in `order`; window=k: only the k newest packs are tried (the negative control)."""
    packs, free = [], []
    for i in order:
        start = 0 if window is None else max(0, len(packs) - window)
        for p in range(start, len(packs)):
            if free[p] >= lengths[i]:
                packs[p].append(i)
                free[p] -= lengths[i]
                break
        else:
            packs.append([i])
            free.append(cap - lengths[i])
    return packs


def test_random_order_first_fit_matches_textbook_and_counts_tokens():
    """The planner keeps the two newest packs beside its tree; it must still be exactly first fit, in any order."""
    from data_modules.planning import _first_fit

    rng = random.Random(3)
    differs_from_two_newest = 0
    for trial in range(120):
        cap = rng.choice([16, 100, 512])
        n = rng.randint(0, 400)
        if trial % 3 == 0:  # lengths up to the capacity: old packs keep wide gaps (the tree's path)
            lengths = [rng.randint(0, cap) for _ in range(n)]
        else:  # log-normal: nearly everything lands in the two newest packs
            lengths = [min(cap, max(1, int(rng.lognormvariate(2.5, 1.0)))) for _ in range(n)]
        order = list(range(n))
        rng.shuffle(order)
        expected = _naive_first_fit(lengths, cap, order)
        packs, tokens = _first_fit(lengths, order, cap)
        assert packs == expected == plan_packs(lengths, cap, order=order)
        assert tokens == [sum(lengths[i] for i in p) for p in packs] and all(t <= cap for t in tokens)
        differs_from_two_newest += expected != _naive_first_fit(lengths, cap, order, window=2)
    # negative control: these inputs need the older packs (a planner that forgot them would fail above)
    assert differs_from_two_newest > 20


def test_ffd_example_and_visual_balancing():
    assert plan_packs([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    lengths = [50] * 8
    visual = [40, 40, 40, 40, 0, 0, 0, 0]
    plain = plan_packs(lengths, 200, visual)
    balanced = plan_packs(lengths, 200, visual, balance_visual_tokens=True)
    per_pack = lambda packs: sorted(sum(visual[i] for i in p) for p in packs)  # noqa: E731
    assert per_pack(plain) == [0, 160]
    assert per_pack(balanced) == [80, 80] and len(balanced) == 2


def test_datamodule_rows_invariants(emb, tmp_path):
    dm = MultimodalPackingDataModule(model_path="embedded", train_path="embedded", embedded_cache_dir=str(emb.root.parent),
                                     max_tokens=512, pad_to_multiple_of=64, num_workers=0, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.val_dataset is not None  # the embedded validation split is picked automatically
    assert dm.train_dataset.fill > 0.97
    seen_docs = 0
    for k, batch in enumerate(dm.train_dataloader()):
        if k == 6:
            break
        T = batch["input_ids"].shape[1]
        cu = batch["cu_seqlens"]
        assert T % 64 == 0 and T <= 512 and cu[0] == 0 and cu[-1] == T
        lens = (cu[1:] - cu[:-1]).tolist()
        assert min(lens) > 0 and batch["max_seqlen"] == max(lens)
        real = int(cu[batch["num_documents"]])
        assert len(lens) == batch["num_documents"] + (1 if real < T else 0)
        labels = batch["labels"][0]
        assert (labels[real:] == IGNORE).all() and (labels[cu[:-1].long()] == IGNORE).all()
        assert batch["num_label_tokens"] == int((labels != IGNORE).sum()) > 0
        mask = batch["attention_mask"][0]
        assert mask[:real].all() and not mask[real:].any()  # tail padding marked for the MoE statistics
        assert (batch["position_ids"][:, 0, cu[:-1].long()] == 0).all()  # positions restart per document
        assert batch["position_ids"].shape == (3, 1, T)
        n_img = int((batch["mm_token_type_ids"] == 1).sum())
        if batch["image_grid_thw"] is None:
            assert n_img == 0 and batch["pixel_values"] is None
        else:
            patches = int(batch["image_grid_thw"].prod(-1).sum())
            assert n_img == patches // 4 and batch["pixel_values"].shape[0] == patches
        seen_docs += batch["num_documents"]
    assert seen_docs > 6


def test_test_split_needs_test_path(emb, tmp_path):
    kw = dict(model_path="embedded", train_path="embedded", embedded_cache_dir=str(emb.root.parent), max_tokens=512,
              num_workers=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.test_path"):
        MultimodalPackingDataModule(**kw).test_dataloader()
    dm = MultimodalPackingDataModule(test_path="embedded", **kw)
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[1] <= 512 and batch["num_label_tokens"] > 0
    assert dm.stats["test"]["ok"] == len(dm.test_dataset.records)


def _lognormal_lengths(n=4000, cap=4096, seed=0):
    rng = random.Random(seed)  # the shape of bench/bench_packing.py's corpus: log-normal answers, some images
    return [min(cap, int(1.3 * rng.lognormvariate(5.0, 1.0)) + rng.randint(23, 50) + (rng.random() < 0.3) * 64)
            for _ in range(n)]


def _mixed(packs, label):
    return sum(len({label[i] for i in p}) == 2 for p in packs) / len(packs)


def test_training_packs_mix_documents_whose_label_follows_their_length():
    rng = random.Random(1)
    label = [rng.random() < 0.5 for _ in range(800)]
    lengths = [31 if y else 30 for y in label]  # the label is fully determined by the length
    plan = EpochPackPlan(lengths, 256, seed=0)
    for epoch in range(3):
        assert _mixed(plan.packs(epoch), label) >= 0.9
    # negative control: first-fit-decreasing (what training used to get) puts each label in its own packs
    assert _mixed(plan_packs(lengths, 256), label) <= 0.05


def test_training_plan_replanned_per_epoch_deterministic_and_complete():
    lengths = _lognormal_lengths(1500, 1024)
    plan = EpochPackPlan(lengths, 1024, seed=5)
    again = EpochPackPlan(lengths, 1024, seed=5)
    epochs = [plan.packs(e) for e in range(4)]
    assert all(again.packs(e) == epochs[e] for e in (3, 0, 2, 1))  # a pure function of (seed, epoch), any order
    assert EpochPackPlan(lengths, 1024, seed=6).packs(0) != epochs[0]
    # the packs themselves change, not only their order (a document too long to share its pack stays alone)
    contents = [{tuple(sorted(p)) for p in packs if len(p) > 1} for packs in epochs]
    assert len(contents[0]) > 0.5 * plan.num_packs and len(contents[0] & contents[1]) < 0.05 * len(contents[0])
    for packs in epochs:
        assert len(packs) == plan.num_packs  # the same epoch length every epoch (Lightning sizes epochs once)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))  # every document exactly once
        assert all(sum(lengths[i] for i in p) <= 1024 for p in packs)
    assert plan.num_packs <= 1.03 * len(plan_packs(lengths, 1024))  # seen: 505 vs 497
    fixed = EpochPackPlan(lengths, 1024, shuffle=False)
    assert fixed.packs(0) == fixed.packs(7) == plan_packs(lengths, 1024)  # evaluation: FFD, planned once


def test_training_plans_deterministic_with_one_count_and_within_capacity_every_epoch(caplog):
    """Above 2000 packs the target is epoch 0's count plus 1/2000 of it: every epoch is split to it, any plan
    instance gives the same packs for (lengths, options, seed, epoch), and no pack exceeds max_tokens."""
    from data_modules import planning

    lengths = _lognormal_lengths(20000, 1024, seed=2)
    plan = EpochPackPlan(lengths, 1024, seed=5)
    drawn = len(plan._random_plan(0, 0)[0])
    assert drawn > planning.SLACK and plan.num_packs == drawn + drawn // planning.SLACK
    again = EpochPackPlan(lengths, 1024, seed=5)
    epochs = {e: plan.packs(e) for e in range(6)}
    for e in (4, 0, 5, 2, 1, 3):  # any order, another instance: the same plan
        assert again.packs(e) == epochs[e] and again.pack_tokens(e) == plan.pack_tokens(e)
    for e, packs in epochs.items():
        assert len(packs) == plan.num_packs
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        tokens = plan.pack_tokens(e)
        assert tokens == [sum(lengths[i] for i in p) for p in packs] and max(tokens) <= 1024
    assert len({tuple(map(tuple, p)) for p in epochs.values()}) == 6  # re-planned every epoch
    # the first random order of every epoch fits the target (no redraws), and the count is the split's doing:
    # negative control, the random orders themselves need different numbers of packs
    raw = [len(plan._random_plan(e, 0)[0]) for e in range(6)]
    assert max(raw) <= plan.num_packs and len(set(raw)) > 1
    assert EpochPackPlan(lengths, 1024, seed=6).packs(1) != epochs[1]  # and the seed matters
    # small plans keep epoch 0's exact count (no slack below 2000 packs)
    small = EpochPackPlan(lengths[:500], 1024, seed=5)
    assert small.num_packs == len(small._random_plan(0, 0)[0])
    # fallback: when no random order fits, epoch 0's packs are used again, with a warning
    plan._random_plan = lambda epoch, attempt: ([[i] for i in range(len(lengths))], list(lengths))
    with caplog.at_level("WARNING", logger="data_modules.planning"):
        assert plan.packs(9) is epochs[0]
    assert "reusing epoch 0's packs" in caplog.text


def test_training_plan_efficiency_on_lognormal_lengths():
    lengths = _lognormal_lengths()
    plan = EpochPackPlan(lengths, 4096, seed=0)
    for epoch in range(3):
        padded = sum(-(-t // 64) * 64 for t in plan.pack_tokens(epoch))
        assert sum(lengths) / padded >= 0.98


def test_epoch_with_fewer_packs_splits_and_visual_balancing_still_spreads_images():
    from data_modules.planning import split_to_count

    packs = split_to_count([[0, 1, 2, 3], [4], [5, 6]], 5)
    assert sorted(i for p in packs for i in p) == list(range(7)) and len(packs) == 5
    assert split_to_count([[0], [1]], 4) == [[0], [1]]  # nothing left to split
    lengths = [50] * 40
    visual = [40 if i < 10 else 0 for i in range(40)]
    plan = EpochPackPlan(lengths, 200, visual, balance_visual_tokens=True, seed=0)
    for epoch in range(3):
        per_pack = sorted(sum(visual[i] for i in p) for p in plan.packs(epoch))
        assert per_pack[-1] - per_pack[0] <= 40  # 10 images over 10 packs: one each


def test_datamodule_packs_mix_answers_of_different_token_lengths(emb, tmp_path):
    import json

    # a two-answer task whose answers tokenise to different lengths: length alone gives the answer away
    rng = random.Random(0)
    path = tmp_path / "two.jsonl"
    with open(path, "w") as f:
        for _ in range(300):
            answer = rng.choice(["one", "one two"])
            f.write(json.dumps({"messages": [{"role": "user", "content": "Say it."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    dm = MultimodalPackingDataModule(model_path=str(emb.model_dir), train_path=str(path), max_tokens=256,
                                     pad_to_multiple_of=16, num_workers=0, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    records = dm.train_dataset.records
    assert len(set(records["num_tokens"])) == 2
    label = [n == max(records["num_tokens"]) for n in records["num_tokens"]]
    for epoch in (0, 1):
        dm.train_sampler.set_epoch(epoch)
        packs = [batch["documents"] for batch in dm.train_dataloader()]
        assert sorted(i for p in packs for i in p) == list(range(len(records)))
        assert _mixed(packs, label) >= 0.9
