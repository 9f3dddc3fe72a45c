"""Resumable, token-balanced distributed sampler over packs.

Every rank computes the same global order (seed + epoch), so no communication is needed:
1. the pack indices are shuffled with `torch.Generator().manual_seed(seed + epoch)` (or kept in order);
2. the order is cut into rounds of `num_replicas` packs (the last round is filled by wrapping around to the start
   of the order, as torch's DistributedSampler does, so every rank runs the same number of steps and collectives
   never hang);
3. within a round the longest pack goes to the rank with the fewest tokens so far (LPT), which keeps the ranks'
   cumulative token counts within one pack of each other.

Resume: `consumed` counts the micro-batches this rank has handed to the training step in the current epoch (the
DataModule increments it from `on_before_batch_transfer`, which Lightning calls in the main process right before
each step, so DataLoader prefetching does not inflate it). `state_dict()` / `load_state_dict()` carry
(epoch, consumed); the next `__iter__` for that epoch starts after the consumed packs. Subclassing
DistributedSampler stops Lightning from wrapping this sampler in its own distributed sampler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


class PackSampler(DistributedSampler):
    def __init__(self, pack_tokens: Sequence[int], num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        # DistributedSampler.__init__ is not called: it wants a dataset and a process group; nothing else is used.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if not pack_tokens:
            raise ValueError("no packs to sample from")
        self.pack_tokens = [int(t) for t in pack_tokens]
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.epoch = 0
        self.drop_last = False
        self.num_samples = math.ceil(len(self.pack_tokens) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.consumed = 0  # micro-batches of the current epoch handed to the step
        self._resume_at = 0  # where the next __iter__ starts

    def rank_orders(self, epoch: int) -> list[list[int]]:
        """The pack order of every rank for `epoch` (identical on all ranks)."""
        n = len(self.pack_tokens)
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
            chunk = sorted(order[start : start + self.num_replicas], key=lambda p: (-self.pack_tokens[p], p))
            ranks = sorted(range(self.num_replicas), key=lambda r: (load[r], r))
            for p, r in zip(chunk, ranks):
                per_rank[r].append(p)
                load[r] += self.pack_tokens[p]
        return per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_at = 0
            self.consumed = 0

    def __iter__(self):
        order = self.rank_orders(self.epoch)[self.rank]
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
                "num_packs": len(self.pack_tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_packs") != len(self.pack_tokens) or state.get("seed") != self.seed:
            log.warning("sampler state is for %s packs / seed %s, now %d packs / seed %d: the data or options "
                        "changed, so the saved position is not meaningful; starting epoch %s from its beginning",
                        state.get("num_packs"), state.get("seed"), len(self.pack_tokens), self.seed,
                        state.get("epoch"))
            self.epoch, self._resume_at, self.consumed = int(state.get("epoch", 0)), 0, 0
            return
        if state.get("num_replicas") != self.num_replicas:
            log.warning("sampler state was saved with %s data-parallel ranks, now %d: the per-rank order differs, "
                        "so epoch %s restarts from its beginning", state.get("num_replicas"), self.num_replicas,
                        state.get("epoch"))
            self.epoch, self._resume_at, self.consumed = int(state["epoch"]), 0, 0
            return
        self.epoch = int(state["epoch"])
        self._resume_at = self.consumed = min(int(state["consumed"]), self.num_samples)
