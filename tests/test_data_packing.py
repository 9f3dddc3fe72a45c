"""First-fit-decreasing planning and the packed rows the DataModule produces."""

from __future__ import annotations

import random

import pytest

from data_modules import MultimodalPackingDataModule, plan_packs
from data_modules.encoding import IGNORE
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def _naive_ffd(lengths, cap):
    packs, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for p, f in enumerate(free):
            if f >= lengths[i]:
                packs[p].append(i)
                free[p] -= lengths[i]
                break
        else:
            packs.append([i])
            free.append(cap - lengths[i])
    return packs


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
