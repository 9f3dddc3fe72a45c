"""Distributed pack sampling and mid-epoch resume: same packs in the same order as an uninterrupted run, on 1 and 2
ranks, in epoch 0 and in a re-planned epoch 1; a position carried over to another number of ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from data_modules import EpochPackPlan, MultimodalPackingDataModule, PackSampler
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dscache"))


def _dm(emb, cache, rank=0, world=1, workers=0, **kw):
    return MultimodalPackingDataModule(model_path=str(emb.model_dir), train_path=str(emb.val_path), val_path=None,
                                       max_tokens=256, pad_to_multiple_of=16, num_workers=workers, seed=7,
                                       cache_dir=cache, rank=rank, world_size=world, **kw)


def _epoch(dm, epoch, limit=None, count=True):
    dm.train_sampler.set_epoch(epoch)
    seen = []
    for batch in dm.train_dataloader():
        if limit is not None and len(seen) == limit:
            break
        if count:
            dm.on_before_batch_transfer(batch, 0)  # what Lightning calls right before each training step
        seen.append(tuple(batch["documents"]))
    return seen


def test_sampler_ranks_disjoint_balanced_and_seeded():
    lengths = [20 + (i * 37) % 90 for i in range(60)]
    plan = EpochPackPlan(lengths, 256, seed=3)
    tokens = plan.pack_tokens(0)
    n = plan.num_packs
    assert n >= 15 and all(t <= 256 for t in tokens)
    for world in (1, 2, 3):
        orders = [PackSampler(plan, world, r, seed=3).rank_orders(0)[r] for r in range(world)]
        assert len({len(o) for o in orders}) == 1  # same number of steps on every rank
        flat = [p for o in orders for p in o]
        assert set(flat) == set(range(n))  # every pack somewhere; repeats only to fill the last round
        assert len(flat) - len(set(flat)) == (-n) % world
        loads = [sum(tokens[p] for p in o) for o in orders]
        assert max(loads) - min(loads) <= max(tokens)  # LPT per round keeps ranks within one pack
        docs = [i for r in range(world) for pack in PackSampler(plan, world, r, seed=3).rank_packs(0) for i in pack]
        assert sorted(set(docs)) == list(range(60))  # every document drawn in the epoch
    s = PackSampler(plan, 1, 0, seed=3)
    assert s.rank_packs(0) == PackSampler(EpochPackPlan(lengths, 256, seed=3), 1, 0, seed=3).rank_packs(0)
    assert s.rank_orders(0) != s.rank_orders(1)  # reshuffled per epoch
    fixed = EpochPackPlan(lengths, 256, shuffle=False)
    assert PackSampler(fixed, 1, 0, shuffle=False).rank_orders(5)[0] == list(range(fixed.num_packs))


def _resumed(plan, state: dict, world: int) -> list[list[int]]:
    """Every rank's pack order after loading `state` on `world` ranks (what its next __iter__ yields)."""
    out = []
    for r in range(world):
        s = PackSampler(plan, world, r, seed=3)
        s.load_state_dict(state)
        out.append(s.rank_orders(s.epoch)[r][s.consumed:])
    return out


def test_resume_on_another_number_of_ranks_continues_the_epoch_at_the_same_pack():
    """A checkpoint of 4 ranks (2 x 2 nodes) resumed on 1 process or on 2 ranks: each step draws the packs the 4
    ranks would have drawn next (one process: all of a step's packs as its micro-batches), in the epoch's order."""
    plan = EpochPackPlan([20 + (i * 37) % 90 for i in range(120)], 256, seed=3)
    order = PackSampler(plan, 1, 0, seed=3).rank_orders(0)[0]  # the epoch's global order
    four = [PackSampler(plan, 4, r, seed=3) for r in range(4)]
    assert {p for s in four for p in s.rank_orders(0)[s.rank][:2]} == set(order[:8])  # 2 steps of 4 ranks
    state = dict(four[0].state_dict(), consumed=2)
    (alone,) = _resumed(plan, state, 1)
    assert alone == order[8:]
    pair = _resumed(plan, state, 2)
    full_rounds = (len(order) - 8) // 2  # a last, partial round is filled by wrapping around to the epoch's start
    assert full_rounds >= 5
    for step, packs in enumerate(list(zip(*pair))[:full_rounds]):
        assert set(packs) == set(order[8 + 2 * step: 10 + 2 * step])
    # and back: 1 process after 8 micro-batches resumed on 4 ranks starts at the same pack
    back = _resumed(plan, dict(PackSampler(plan, 1, 0, seed=3).state_dict(), consumed=8), 4)
    assert {p for r in back for p in r[:1]} == set(order[8:12])
    # negative control: 3 ranks do not divide the 8 packs drawn: the epoch restarts from its beginning
    restarted = _resumed(plan, state, 3)
    assert restarted == [PackSampler(plan, 3, r, seed=3).rank_orders(0)[r] for r in range(3)]


def test_a_position_saved_by_an_older_planner_restarts_its_epoch(caplog):
    """The planner's version is in the plan fingerprint: an older planner drew other packs for the same data, so its
    saved position restarts the epoch (logged) instead of continuing into packs it never planned."""
    plan = EpochPackPlan([20 + (i * 37) % 90 for i in range(120)], 256, seed=3)
    state = dict(PackSampler(plan, 1, 0, seed=3).state_dict(), epoch=1, consumed=5)
    resumed = PackSampler(plan, 1, 0, seed=3)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.consumed) == (1, 5)  # control: this planner's position continues
    older = dict(state, plan={k: v for k, v in state["plan"].items() if k != "planner"})
    restarted = PackSampler(plan, 1, 0, seed=3)
    with caplog.at_level("WARNING", logger="data_modules.sampler"):
        restarted.load_state_dict(older)
    assert (restarted.epoch, restarted.consumed) == (1, 0) and "not meaningful" in caplog.text


@pytest.mark.parametrize("world", [1, 2])
def test_resume_mid_epoch_same_order(emb, cache, world):
    for rank in range(world):
        ref = _dm(emb, cache, rank, world)
        ref.setup("fit")
        full0, full1 = _epoch(ref, 0), _epoch(ref, 1)
        assert len(full0) >= 4

        first = _dm(emb, cache, rank, world)
        first.setup("fit")
        head = _epoch(first, 0, limit=3)
        state = first.state_dict()
        assert state["sampler"]["consumed"] == 3 and state["sampler"]["epoch"] == 0

        resumed = _dm(emb, cache, rank, world)
        resumed.load_state_dict(state)  # before setup, as on a Lightning restore
        resumed.setup("fit")
        assert head + _epoch(resumed, 0) == full0
        assert _epoch(resumed, 1) == full1


def test_resume_with_a_worker_process(emb, cache):
    # torch's multi-worker loader calls iter(sampler) twice and drops the first iterator: the resume offset must
    # survive that (it used to be spent by the dropped iterator, so a resumed epoch restarted from the top)
    ref = _dm(emb, cache)
    ref.setup("fit")
    full = _epoch(ref, 0)
    first = _dm(emb, cache)
    first.setup("fit")
    head = _epoch(first, 0, limit=3)
    resumed = _dm(emb, cache, workers=1)
    resumed.load_state_dict(first.state_dict())
    resumed.setup("fit")
    assert head + _epoch(resumed, 0) == full


def test_data_parallel_coordinates_come_from_the_trainer(emb, cache):

    dm = MultimodalPackingDataModule(model_path=str(emb.model_dir), train_path=str(emb.val_path), val_path=None,
                                     cache_dir=cache)
    assert dm._coords() == (0, 1)
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 4, "rank": 3}, training=True)
    assert dm._coords() == (3, 4)  # each rank draws its own packs (it used to read a non-existent attribute)


def test_consumed_count_ignores_worker_prefetch(emb, cache):
    dm = _dm(emb, cache, workers=2)
    dm.setup("fit")
    ref = _dm(emb, cache)
    ref.setup("fit")
    full = _epoch(ref, 0)
    head = _epoch(dm, 0, limit=2)  # two workers have prefetched several more packs by now
    resumed = _dm(emb, cache)
    resumed.load_state_dict(dm.state_dict())
    resumed.setup("fit")
    assert head + _epoch(resumed, 0) == full


def test_lightning_checkpoint_resume(emb, cache, tmp_path):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(batch["documents"]))
            return (self.w * batch["num_label_tokens"]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(**kw):
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                          default_root_dir=str(tmp_path), **kw)

    whole = Recorder()
    trainer(max_epochs=2, enable_checkpointing=False).fit(whole, datamodule=_dm(emb, cache))
    per_epoch = len(whole.seen) // 2
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=per_epoch + 3, save_top_k=-1)
    part = Recorder()
    trainer(max_steps=per_epoch + 3, callbacks=[ckpt]).fit(part, datamodule=_dm(emb, cache))
    path = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={per_epoch + 3}" in p.name)
    rest = Recorder()
    trainer(max_epochs=2).fit(rest, datamodule=_dm(emb, cache), ckpt_path=str(path))
    assert part.seen + rest.seen == whole.seen


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_1_of_replanned_packs(emb, cache, workers):
    # epoch 1 has its own packs (re-planned); a run stopped 3 packs into it resumes on exactly those packs
    ref = _dm(emb, cache)
    ref.setup("fit")
    full0, full1 = _epoch(ref, 0), _epoch(ref, 1)
    assert set(full0) != set(full1)  # different pack contents, not only a different order
    first = _dm(emb, cache)
    first.setup("fit")
    _epoch(first, 0)
    head = _epoch(first, 1, limit=3)
    state = first.state_dict()
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["consumed"] == 3
    resumed = _dm(emb, cache, workers=workers)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert resumed.train_sampler.epoch == 1
    resumed.train_sampler.set_epoch(1)  # as Lightning does at the epoch start: the position survives it
    rest = [tuple(batch["documents"]) for batch in resumed.train_dataloader()]
    assert head + rest == full1


def test_resume_position_moves_the_loop_counters_by_what_the_sampler_moved(emb, cache):
    """callbacks.ResumePosition: 2 micro-batches per rank of a 4-rank checkpoint are 8 on one process; Lightning's
    batch counters (where accumulation ends a step) move with them, their differences kept. Same layout: untouched.
    (Without it, a 2 x 2 checkpoint resumed on one process accumulating 4 ended 4.6e-3 away from the uninterrupted
    run: tests/test_app_multinode.py.)"""
    from callbacks import ResumePosition

    def checkpoint():
        counts = {"ready": 2, "completed": 1, "started": 2, "processed": 2}  # written at the end of batch 2
        return {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": dict(counts), "current": dict(counts),
                                                                      "is_last_batch": False}}}}

    dm = _dm(emb, cache)
    dm.setup("fit")
    dm.load_state_dict({"sampler": dict(PackSampler(dm.train_sampler.plan, 4, 0, seed=7).state_dict(), consumed=2)})
    assert dm.train_sampler.consumed == 8 and dm.train_sampler.resume_shift == 6
    ckpt = checkpoint()
    ResumePosition().on_load_checkpoint(SimpleNamespace(datamodule=dm), None, ckpt)
    moved = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert moved["current"] == moved["total"] == {"ready": 8, "completed": 7, "started": 8, "processed": 8}
    same = _dm(emb, cache)
    same.setup("fit")
    same.load_state_dict({"sampler": dict(same.train_sampler.state_dict(), consumed=2)})
    ckpt = checkpoint()
    ResumePosition().on_load_checkpoint(SimpleNamespace(datamodule=same), None, ckpt)
    assert ckpt == checkpoint() and same.train_sampler.consumed == 2
