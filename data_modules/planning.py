"""Which documents go into which packed row: bin packing by token count, re-planned every training epoch.

Two planners, one first-fit core (`plan_packs`):
- evaluation (val / test) and `shuffle: false`: first-fit-decreasing (longest first, ties by index), planned once.
  The fullest packs, but each pack holds documents of similar length.
- training (`EpochPackPlan`, shuffle on): the documents in a random order seeded by (seed, epoch), then first fit.
  Why not FFD for training: when length correlates with content (answer words of different token counts, task
  types, languages, short answers vs long reasoning) FFD puts documents of one kind together, every optimizer step
  sees one kind only and the model chases the prior; a tiny model never learned a two-answer image task that way.
  Random-order first fit mixes: each pack is the prefix of a random order plus gap fillers, and the contents
  change every epoch. Efficiency stays high (first fit keeps every pack open; `bench/bench_packing.py`: 0.997
  non-pad fraction vs 0.9995 for FFD at 4096-token packs); the gap fillers are the one residual length bias
  (short documents end up in partly filled packs a bit more often).

Every training epoch has the same number of packs (Lightning sizes an epoch, the LR schedule and the progress bar
from the loader length once): the count of epoch 0 is the target; a later epoch whose random order needs more packs
is drawn again (next attempt seed), one that needs fewer splits its most crowded packs in two. Plans are pure
functions of (lengths, max_tokens, seed, epoch): every data-parallel rank computes the same plan without talking,
and a resumed run re-plans its epoch exactly.

`balance_visual_tokens`: as many packs as plain FFD needs are opened up front and documents with vision tokens go
to the fitting pack with the fewest vision tokens so far (text documents first-fit), which evens out vision-tower
work per micro-batch at a small fill cost; for training, the documents with vision tokens are placed first (in
their random order), then the text documents.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Sequence

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16  # random orders tried for an epoch before falling back to epoch 0's plan


def plan_packs(lengths: Sequence[int], max_tokens: int, visual: Sequence[int] | None = None,
               balance_visual_tokens: bool = False, order: Sequence[int] | None = None) -> list[list[int]]:
    """First-fit bin packing of document indices into packs of at most max_tokens tokens, documents taken in
    `order` (default: longest first, ties by index, i.e. first-fit-decreasing).

    First fit is a max segment tree over the free space of packs 0..n-1 (unopened packs have max_tokens free), so
    "leftmost pack with free >= n" is O(log n) and opening a new pack needs no special case. Every rank plans every
    epoch of a million-document corpus: the loop is written for speed (`bench/bench_data_scale.py`).
    """
    lengths = [int(n) for n in lengths]
    if any(n > max_tokens for n in lengths):
        raise ValueError("a sample is longer than max_tokens; truncate or drop it before planning")
    if not lengths:
        return []
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    balance = balance_visual_tokens and visual is not None
    # The tree covers as many packs as first fit can open: any two of its packs hold more than max_tokens together
    # (a document of the later one did not fit in the earlier one), so at most 2 * ceil(total / max_tokens) + 1.
    # Balancing places vision documents by another rule, so it keeps one leaf per document.
    bound = len(lengths) if balance else min(len(lengths), 2 * (-(-sum(lengths) // max_tokens)) + 1)
    size = 1
    while size < bound:
        size *= 2
    tree = [max_tokens] * (2 * size)

    if not balance:
        return _first_fit(lengths, order, tree, size)

    # Balancing spreads the vision samples over as many packs as plain FFD would need (opened up front), picking
    # the fitting pack with the fewest vision tokens through a lazy min-heap; text samples then fill the gaps.
    n_target = len(plan_packs(lengths, max_tokens)) if balance else 0
    packs: list[list[int]] = [[] for _ in range(n_target)]
    vis: list[int] = [0] * n_target
    heap = [(0, p) for p in range(n_target)]
    for i in order:
        n = lengths[i]
        chosen = -1
        if visual[i] > 0:
            aside = []
            while heap and len(aside) < 64:  # bounded: past 64 full candidates, first fit decides
                v, p = heapq.heappop(heap)
                if v != vis[p]:
                    continue  # stale entry
                if tree[p + size] >= n:
                    chosen = p
                    break
                aside.append((v, p))
            for item in aside:
                heapq.heappush(heap, item)
        if chosen < 0:
            chosen = _leftmost_fit(tree, size, n)
        if chosen == len(packs):
            packs.append([])
            vis.append(0)
        packs[chosen].append(i)
        _take(tree, chosen + size, n)
        vis[chosen] += int(visual[i])
        heapq.heappush(heap, (vis[chosen], chosen))
    return [p for p in packs if p]


def _leftmost_fit(tree: list[int], size: int, n: int) -> int:
    """The leftmost pack with free >= n (unopened packs have max_tokens free)."""
    if tree[1] < n:
        raise AssertionError("pack tree full: the first-fit bound is wrong")
    node = 1
    while node < size:
        node <<= 1
        if tree[node] < n:
            node += 1
    return node - size


def _take(tree: list[int], node: int, n: int) -> None:
    """n tokens of leaf `node` used; the new maxima upwards until a node keeps its value (then every ancestor does)."""
    tree[node] -= n
    node >>= 1
    while node:
        left, right = tree[2 * node], tree[2 * node + 1]
        top = left if left > right else right
        if tree[node] == top:
            break
        tree[node] = top
        node >>= 1


def _first_fit(lengths: list[int], order: Sequence[int], tree: list[int], size: int) -> list[list[int]]:
    """Plain first fit in `order`: `_leftmost_fit` and `_take` inlined (the hot loop of every epoch's plan, a
    million documents at scale: function calls were half its time)."""
    packs: list[list[int]] = []
    for i in order:
        n = lengths[i]
        node = 1
        while node < size:
            node <<= 1
            if tree[node] < n:
                node += 1
        p = node - size
        if p == len(packs):
            packs.append([i])
        else:
            packs[p].append(i)
        tree[node] -= n
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            top = left if left > right else right
            if tree[node] == top:
                break
            tree[node] = top
            node >>= 1
    if min(tree[size: size + len(packs)]) < 0:  # a document placed where it did not fit: the tree was too small
        raise AssertionError("pack tree full: the first-fit bound is wrong")
    return packs


def split_to_count(packs: list[list[int]], count: int) -> list[list[int]]:
    """Split the packs with the most documents in two (first half / second half) until there are `count` packs or
    every pack holds one document. Splitting keeps every pack within its capacity."""
    packs = [list(p) for p in packs]
    heap = [(-len(p), k) for k, p in enumerate(packs)]
    heapq.heapify(heap)
    while len(packs) < count and heap:
        neg, k = heapq.heappop(heap)
        if -neg < 2:
            break
        half = -neg // 2
        packs.append(packs[k][half:])
        packs[k] = packs[k][:half]
        for j in (k, len(packs) - 1):
            heapq.heappush(heap, (-len(packs[j]), j))
    return packs


class EpochPackPlan:
    """The packs of every epoch (lists of document indices), a pure function of (lengths, options, seed, epoch).

    shuffle=False: one first-fit-decreasing plan for every epoch. shuffle=True: random-order first fit per epoch
    with `num_packs` packs every epoch (see the module doc). Plans are cached per epoch (the last few)."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, visual: Sequence[int] | None = None,
                 balance_visual_tokens: bool = False, shuffle: bool = True, seed: int = 0):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("no documents to pack")
        self.visual = None if visual is None else [int(v) for v in visual]
        self.max_tokens, self.balance, self.shuffle, self.seed = max_tokens, balance_visual_tokens, shuffle, seed
        self._cache: dict[int, list[list[int]]] = {}
        self._fixed = None if shuffle else self._plan(None)
        if self._fixed is None:
            self._cache[0] = self._random_plan(0, 0)
        self.num_packs = len(self._fixed if self._fixed is not None else self._cache[0])

    def _plan(self, order) -> list[list[int]]:
        return plan_packs(self.lengths, self.max_tokens, self.visual, self.balance, order)

    def _random_plan(self, epoch: int, attempt: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        random.Random(f"qmoe-packs-{self.seed}-{epoch}-{attempt}").shuffle(order)  # str seeds: stable everywhere
        if self.balance and self.visual is not None:
            # documents with vision tokens first, each to the pack with the fewest so far; text fills the rest (in
            # a random order text would fill the packs before the images come, leaving nothing to balance)
            order = [i for i in order if self.visual[i] > 0] + [i for i in order if self.visual[i] == 0]
        return self._plan(order)

    def packs(self, epoch: int) -> list[list[int]]:
        if self._fixed is not None:
            return self._fixed
        packs = self._cache.get(epoch)
        if packs is None:
            packs = self._draw(epoch)
            # the current epoch, epoch 0 (the reference count) and one more are enough
            for old in [e for e in self._cache if e not in (0, epoch)][:-1]:
                del self._cache[old]
            self._cache[epoch] = packs
        return packs

    def _draw(self, epoch: int) -> list[list[int]]:
        for attempt in range(MAX_ATTEMPTS if epoch else 1):
            packs = self._random_plan(epoch, attempt)
            if len(packs) <= self.num_packs:
                return split_to_count(packs, self.num_packs)
        log.warning("epoch %d: %d random orders all needed more than %d packs; reusing epoch 0's packs", epoch,
                    MAX_ATTEMPTS, self.num_packs)
        return self._cache[0]  # never evicted

    def pack_tokens(self, epoch: int) -> list[int]:
        return [sum(self.lengths[i] for i in p) for p in self.packs(epoch)]

    def fingerprint(self) -> dict:
        """What a saved sampler position is only meaningful for."""
        return {"num_documents": len(self.lengths), "num_tokens": sum(self.lengths), "max_tokens": self.max_tokens,
                "num_packs": self.num_packs}
