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
from the loader length once). The target is the pack count of epoch 0's random order plus 1/2000 of it (`SLACK`,
rounded down: none below 2000 packs); every epoch, epoch 0 included, splits its most crowded packs in two until it
has the target, and an epoch whose random order needs more packs is drawn again (next attempt seed; after
`MAX_ATTEMPTS`, epoch 0's packs again). Why the slack: a random order's count varies by about one pack at 50K packs
of log-normal lengths (tens when lengths spread up to max_tokens), and with epoch 0's own count as the target an
epoch 0 that drew a low count made every later epoch redraw many times (21.6 s per rank at 1.1M documents). With
the slack the first draw fits nearly always; its extra packs are halves of split packs, so the non-pad fraction
does not move (0.998 at 1.1M documents) and only the fill of max_tokens-long rows drops, by the 0.05%. Small
corpora, where a redraw costs milliseconds, keep their exact count. The random order is torch's seeded permutation
(like the sampler's pack order) and first fit is written for speed (`_first_fit`): the next epoch's plan is ~0.3-0.9
s per rank at 1.1M documents (`bench/bench_data_scale.py --plan-only`). Plans are pure functions of (lengths,
max_tokens, seed, epoch) for one torch version: every data-parallel rank computes the same plan without talking,
and a resumed run re-plans its epoch exactly.

`balance_visual_tokens`: as many packs as plain FFD needs are opened up front and documents with vision tokens go
to the fitting pack with the fewest vision tokens so far (text documents first-fit), which evens out vision-tower
work per micro-batch at a small fill cost; for training, the documents with vision tokens are placed first (in
their random order), then the text documents.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16  # random orders tried for an epoch before falling back to epoch 0's plan
SLACK = 2000  # the training target is epoch 0's pack count + count // SLACK (see the module doc)
# In `fingerprint()`: bumped whenever the same inputs give other plans, so a saved sampler position of an older
# planner restarts its epoch instead of continuing into other packs (2: torch orders, the slack).
PLAN_VERSION = 2


def plan_packs(lengths: Sequence[int], max_tokens: int, visual: Sequence[int] | None = None,
               balance_visual_tokens: bool = False, order: Sequence[int] | None = None) -> list[list[int]]:
    """First-fit bin packing of document indices into packs of at most max_tokens tokens, documents taken in
    `order` (default: longest first, ties by index, i.e. first-fit-decreasing).

    First fit is `_first_fit` (a max segment tree over the packs' free space, the two newest packs beside it).
    """
    lengths = [int(n) for n in lengths]
    if any(n > max_tokens for n in lengths):
        raise ValueError("a sample is longer than max_tokens; truncate or drop it before planning")
    if not lengths:
        return []
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not (balance_visual_tokens and visual is not None):
        return _first_fit(lengths, order, max_tokens)[0]

    # Balancing places vision documents by another rule than first fit, so its tree keeps one leaf per document.
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [max_tokens] * (2 * size)
    # Balancing spreads the vision samples over as many packs as plain FFD would need (opened up front), picking
    # the fitting pack with the fewest vision tokens through a lazy min-heap; text samples then fill the gaps.
    n_target = len(plan_packs(lengths, max_tokens))
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


def _first_fit(lengths: list[int], order: Sequence[int], max_tokens: int,
               ordered: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """First fit in `order` -> (packs, tokens of each pack); `ordered`: the lengths in `order`, when the caller has
    them (a torch gather is 5x cheaper than reading a list at a million random indices). Every rank plans every
    epoch of a million-document corpus, so the loop is written for speed (`bench/bench_data_scale.py --plan-only`).

    The two newest packs are plain variables; the packs before them ("settled") are the leaves of a max segment tree
    over their free space (-1 for a leaf not settled yet, so it fits nothing). The leftmost pack with room for n is a
    settled one if the tree's root has room (found in O(log n)), else the first of the two newest with room, else a
    new pack: exactly first fit. Why: in a random order nearly every document lands in one of the two newest packs or
    opens one (98% at 1.1M log-normal documents: settled packs keep gaps shorter than almost every document), so
    most documents cost three comparisons instead of a tree descent and update (1.4 s -> 0.2 s there, with the
    lengths gathered); on lengths whose gaps stay wide (FFD, lengths spread up to max_tokens) the tree does the work.
    """
    packs: list[list[int]] = []
    if len(order) == 0:
        return packs, []
    # The tree covers as many packs as first fit can open: any two of its packs hold more than max_tokens together
    # (a document of the later one did not fit in the earlier one), so at most 2 * ceil(total / max_tokens) + 1.
    bound = 2 * (-(-sum(lengths) // max_tokens)) + 1
    size = 1
    while size < bound:
        size *= 2
    tree = [-1] * (2 * size)
    older = newer = None  # the two newest packs (older = packs[-2]) and their free space
    free_older = free_newer = -1
    for i, n in zip(order, map(lengths.__getitem__, order) if ordered is None else ordered):
        if n <= tree[1]:
            node = 1
            while node < size:
                node <<= 1
                if tree[node] < n:
                    node += 1
            packs[node - size].append(i)
            # the maxima upwards: every node on the path held `old` (the leaf was its maximum) until a sibling holds
            # at least as much, then the rest of the path keeps its value
            old = tree[node]
            top = old - n
            tree[node] = top
            while node > 1:
                sibling = tree[node ^ 1]
                if sibling >= old:
                    break
                node >>= 1
                if sibling > top:
                    top = sibling
                tree[node] = top
        elif free_older >= n:
            free_older -= n
            older.append(i)
        elif free_newer >= n:
            free_newer -= n
            newer.append(i)
        else:
            if older is not None:  # it settles: its free space becomes its leaf, the maxima upwards
                node = len(packs) - 2 + size
                if node >= 2 * size:
                    raise AssertionError("pack tree full: the first-fit bound is wrong")
                tree[node] = free_older
                while node > 1:
                    node >>= 1
                    if tree[node] >= free_older:
                        break
                    tree[node] = free_older
            older, free_older = newer, free_newer
            newer, free_newer = [i], max_tokens - n
            packs.append(newer)
    newest = [free_older, free_newer][-len(packs):]
    free = tree[size: size + len(packs) - len(newest)] + newest
    return packs, [max_tokens - f for f in free]


def split_to_count(packs: list[list[int]], count: int, tokens: list[int] | None = None,
                   lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Split the packs with the most documents in two (first half / second half) until there are `count` packs or
    every pack holds one document, in place (the plan owns its packs: no copy of a million-document plan); returns
    `packs`. Splitting keeps every pack within its capacity. `tokens` (each pack's token count, with the documents'
    `lengths`) is kept up to date when given."""
    heap = [(-len(p), k) for k, p in enumerate(packs)]
    heapq.heapify(heap)
    while len(packs) < count and heap:
        neg, k = heapq.heappop(heap)
        if -neg < 2:
            break
        half = -neg // 2
        second = packs[k][half:]
        del packs[k][half:]
        packs.append(second)
        if tokens is not None:
            moved = sum(map(lengths.__getitem__, second))
            tokens[k] -= moved
            tokens.append(moved)
        for j in (k, len(packs) - 1):
            heapq.heappush(heap, (-len(packs[j]), j))
    return packs


class EpochPackPlan:
    """The packs of every epoch (lists of document indices), a pure function of (lengths, options, seed, epoch).

    shuffle=False: one first-fit-decreasing plan for every epoch. shuffle=True: random-order first fit per epoch
    with `num_packs` packs every epoch (see the module doc). Plans and their pack token counts are cached per epoch
    (the last few): the sampler reads the counts at every epoch start."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, visual: Sequence[int] | None = None,
                 balance_visual_tokens: bool = False, shuffle: bool = True, seed: int = 0):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("no documents to pack")
        if max(self.lengths) > max_tokens:
            raise ValueError("a sample is longer than max_tokens; truncate or drop it before planning")
        self._lengths_t = torch.tensor(self.lengths, dtype=torch.int64)
        self.visual = None if visual is None else [int(v) for v in visual]
        self.max_tokens, self.balance, self.shuffle, self.seed = max_tokens, balance_visual_tokens, shuffle, seed
        self._cache: dict[int, tuple[list[list[int]], list[int]]] = {}
        if shuffle:
            packs, tokens = self._random_plan(0, 0)
            self.num_packs = len(packs) + len(packs) // SLACK
            split_to_count(packs, self.num_packs, tokens, self.lengths)
            self._fixed = None
            self._cache[0] = packs, tokens
        else:
            packs = plan_packs(self.lengths, max_tokens, self.visual, self.balance)
            self._fixed = packs, self._tokens(packs)
            self.num_packs = len(packs)

    def _tokens(self, packs: list[list[int]]) -> list[int]:
        lengths = self.lengths
        return [sum(map(lengths.__getitem__, p)) for p in packs]

    def _random_plan(self, epoch: int, attempt: int) -> tuple[list[list[int]], list[int]]:
        # torch's seeded permutation, as the sampler's pack order: the same on every rank and platform with one torch
        # version; Python's random.shuffle (the planner before) took a third of a million-document epoch's plan
        key = hashlib.sha256(f"qmoe-packs-{self.seed}-{epoch}-{attempt}".encode()).digest()
        perm = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(
            int.from_bytes(key[:8], "little") >> 1))
        order = perm.tolist()
        if self.balance and self.visual is not None:
            # documents with vision tokens first, each to the pack with the fewest so far; text fills the rest (in
            # a random order text would fill the packs before the images come, leaving nothing to balance)
            order = [i for i in order if self.visual[i] > 0] + [i for i in order if self.visual[i] == 0]
            packs = plan_packs(self.lengths, self.max_tokens, self.visual, True, order)
            return packs, self._tokens(packs)
        return _first_fit(self.lengths, order, self.max_tokens, self._lengths_t[perm].tolist())

    def _planned(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        if self._fixed is not None:
            return self._fixed
        planned = self._cache.get(epoch)
        if planned is None:
            planned = self._draw(epoch)
            # the current epoch, epoch 0 (the fallback) and one more are enough
            for old in [e for e in self._cache if e not in (0, epoch)][:-1]:
                del self._cache[old]
            self._cache[epoch] = planned
        return planned

    def packs(self, epoch: int) -> list[list[int]]:
        return self._planned(epoch)[0]

    def _draw(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        for attempt in range(MAX_ATTEMPTS):
            packs, tokens = self._random_plan(epoch, attempt)
            if len(packs) <= self.num_packs:
                split_to_count(packs, self.num_packs, tokens, self.lengths)
                return packs, tokens
        log.warning("epoch %d: %d random orders all needed more than %d packs; reusing epoch 0's packs", epoch,
                    MAX_ATTEMPTS, self.num_packs)
        return self._cache[0]  # never evicted

    def pack_tokens(self, epoch: int) -> list[int]:
        return list(self._planned(epoch)[1])

    def fingerprint(self) -> dict:
        """What a saved sampler position is only meaningful for."""
        return {"num_documents": len(self.lengths), "num_tokens": sum(self.lengths), "max_tokens": self.max_tokens,
                "num_packs": self.num_packs, "planner": PLAN_VERSION}
