"""Resumable, token-balanced distributed sampler over packs; it yields each pack's document indices.

Every rank computes the same global plan and order (seed + epoch), so no communication is needed:
0. the epoch's packs come from `planning.EpochPackPlan` (re-planned every epoch when shuffling, the same number of
   packs every epoch);
1. the pack indices are shuffled with `torch.Generator().manual_seed(seed + epoch)` (or kept in order);
2. the order is cut into rounds of `num_replicas` packs (the last round is filled by wrapping around to the start
   of the order, as torch's DistributedSampler does, so every rank runs the same number of steps and collectives
   never hang);
3. within a round the longest pack goes to the rank with the fewest tokens so far (LPT), which keeps the ranks'
   cumulative token counts within one pack of each other.

Resume: `consumed` counts the micro-batches this rank has handed to the training step in the current epoch (the
DataModule increments it from `on_before_batch_transfer`, which Lightning calls in the main process right before
each step, so DataLoader prefetching does not inflate it). `state_dict()` / `load_state_dict()` carry
(epoch, consumed); the next `__iter__` for that epoch re-plans it and starts after the consumed packs, also on
another number of ranks when it divides the packs drawn so far (`load_state_dict`). Subclassing
DistributedSampler stops Lightning from wrapping this sampler in its own distributed sampler.

Why the sampler yields pack CONTENTS (a tuple of document indices) rather than a pack number: the plan changes
every epoch, and DataLoader workers hold a copy of the dataset made when they started (persistent workers live for
the whole fit); indices travel to the workers with each request, so the workers always load the current plan.
"""

from __future__ import annotations

import logging
import math

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DistributedSampler

from .planning import EpochPackPlan

log = logging.getLogger(__name__)


class PackSampler(DistributedSampler):
    def __init__(self, plan: EpochPackPlan, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        # DistributedSampler.__init__ is not called: it wants a dataset and a process group; nothing else is used.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.plan = plan
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.epoch = 0
        self.drop_last = False
        self.num_samples = math.ceil(plan.num_packs / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.consumed = 0  # micro-batches of the current epoch handed to the step
        self._resume_at = 0  # where the next __iter__ starts
        # a state of another number of ranks, continued: this rank's count - the saved one (callbacks.ResumePosition
        # moves Lightning's batch counters by it); 0 otherwise
        self.resume_shift = 0

    def rank_orders(self, epoch: int) -> list[list[int]]:
        """The pack order (indices into `plan.packs(epoch)`) of every rank for `epoch` (identical on all ranks)."""
        tokens = self.plan.pack_tokens(epoch)
        n = len(tokens)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        per_rank: list[list[int]] = [[] for _ in range(self.num_replicas)]
        load = [0] * self.num_replicas
        for start in range(0, self.total_size, self.num_replicas):
            chunk = sorted(order[start : start + self.num_replicas], key=lambda p: (-tokens[p], p))
            ranks = sorted(range(self.num_replicas), key=lambda r: (load[r], r))
            for p, r in zip(chunk, ranks):
                per_rank[r].append(p)
                load[r] += tokens[p]
        return per_rank

    def rank_packs(self, epoch: int) -> list[tuple[int, ...]]:
        """What this rank draws in `epoch`: the document indices of each of its packs, in order."""
        packs = self.plan.packs(epoch)
        return [tuple(packs[p]) for p in self.rank_orders(epoch)[self.rank]]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_at = 0
            self.consumed = 0

    def __iter__(self):
        order = self.rank_packs(self.epoch)
        start = self._resume_at
        self.consumed = start

        def indices():
            # The resume offset is spent when the first index is DRAWN, not when iter() is called: torch's
            # multi-worker DataLoader iterator calls iter(sampler) twice (in its base __init__ and again in
            # _reset) and drops the first, which would otherwise silently restart a resumed epoch from the top.
            # A later iter() in the same epoch (e.g. a restarted loader) starts from the beginning again.
            self._resume_at = 0
            yield from order[start:]

        return indices()

    def __len__(self) -> int:
        # Full length even after a resume: Lightning sizes the epoch from it and stops on StopIteration.
        return self.num_samples

    def mark_consumed(self, n: int = 1) -> None:
        self.consumed += n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_replicas": self.num_replicas,
                "plan": self.plan.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("plan") != self.plan.fingerprint() or state.get("seed") != self.seed:
            log.warning("sampler state is for data %s / seed %s, now %s / seed %d: the data or options changed (or "
                        "the checkpoint predates per-epoch packing), so the saved position is not meaningful; "
                        "starting epoch %s from its beginning", state.get("plan", state.get("num_packs")),
                        state.get("seed"), self.plan.fingerprint(), self.seed, state.get("epoch"))
            self.epoch, self._resume_at, self.consumed = int(state.get("epoch", 0)), 0, 0
            return
        consumed = int(state["consumed"])
        saved_replicas = int(state.get("num_replicas") or self.num_replicas)
        if saved_replicas != self.num_replicas:
            # Another data-parallel size (a 2 x 2 run resumed on 1 x 4 ranks or on 1 process): the saved ranks drew
            # whole rounds, i.e. the first consumed * saved packs of the epoch's order. Rounds of the new size start
            # at the same pack when it divides that count, so the epoch continues there, each step drawing the
            # packs the old layout would have drawn (within a step, spread over ranks and micro-batches otherwise).
            drawn = consumed * saved_replicas
            if drawn % self.num_replicas:
                log.warning("sampler state was saved with %d data-parallel ranks after %d packs of epoch %s, now %d "
                            "ranks, which do not divide them: epoch %s restarts from its beginning", saved_replicas,
                            drawn, state.get("epoch"), self.num_replicas, state.get("epoch"))
                self.epoch, self._resume_at, self.consumed = int(state["epoch"]), 0, 0
                return
            rank_zero_info(f"data: the sampler state of {saved_replicas} data-parallel ranks continues on "
                           f"{self.num_replicas}: epoch {state.get('epoch')} from its pack {drawn}")
            consumed = drawn // self.num_replicas
            self.resume_shift = consumed - int(state["consumed"])
        self.epoch = int(state["epoch"])
        self._resume_at = self.consumed = min(consumed, self.num_samples)
        if self.consumed >= self.num_samples:
            # saved after the epoch's last micro-batch (a checkpoint at an optimizer step that ends the epoch): the
            # position is the start of the next epoch. Lightning draws the resumed loader's iterator before it sets
            # the next epoch, so an exhausted epoch here would be an empty epoch there and the next epoch's packs
            # would be skipped whole.
            self.epoch, self._resume_at, self.consumed = self.epoch + 1, 0, 0
