"""Held-out answer accuracy on packed rows: exact match of the greedy (argmax) answer, per document.

A document counts as correct when the argmax prediction equals the target at every one of its target positions
(the assistant answer and its `<|im_end|>`). Under teacher forcing that is exactly "greedy decoding from the
prompt reproduces the answer and stops": if every next-token argmax along the reference answer is the reference
token, greedy generation follows the same path. One forward per packed row instead of one generate per question.

Documents are split into image documents (any image/video placeholder in the document) and text documents, so the
bundled image questions (colour / shape / left-right / top-bottom, chance 1/4, 1/3, 1/2, 1/2) are reported apart
from the text tasks.

Targets follow the model: labels shifted left by one, the last token of every document has no target.

`EvaluationAccumulator` (what the LightningModule's validation / test steps feed), built on `evaluation_sums` /
`evaluation_metrics`: what validation and test add up per micro-batch (named fields, one all-reduce at the end of
the epoch) and the metrics logged from the global sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .global_sums import GlobalSums
from .models.lm_loss import next_token_targets
from .models.mtp import MtpOutput


@torch.no_grad()
def document_answer_correct(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mm_token_type_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document with at least one target: (correct bool [D], is_visual bool [D]).

    predictions: argmax token ids at the target positions, in position order (what `label_logits_only` logits
    give after `.argmax(-1)`), or a full (1, T) prediction row.
    """
    targets = next_token_targets(labels, cu_seqlens)[0]  # (T,)
    keep = targets != -100
    T = targets.shape[0]
    if predictions.dim() == 2 and predictions.shape == (1, T):
        predictions = predictions[0][keep]
    if predictions.shape[0] != int(keep.sum()):
        raise ValueError(f"{predictions.shape[0]} predictions for {int(keep.sum())} target positions")
    cu = cu_seqlens.long().to(targets.device)
    doc_of = torch.bucketize(torch.arange(T, device=targets.device), cu[1:], right=True)  # (T,) document index
    n_docs = cu.numel() - 1
    wrong = torch.zeros(n_docs, dtype=torch.long, device=targets.device)
    n_targets = torch.zeros(n_docs, dtype=torch.long, device=targets.device)
    doc_t = doc_of[keep]
    wrong.index_add_(0, doc_t, (predictions.to(targets.device) != targets[keep]).long())
    n_targets.index_add_(0, doc_t, torch.ones_like(doc_t))
    visual = torch.zeros(n_docs, dtype=torch.long, device=targets.device)
    if mm_token_type_ids is not None:
        visual.index_add_(0, doc_of, (mm_token_type_ids[0].to(targets.device) > 0).long())
    has = n_targets > 0
    return (wrong == 0)[has], (visual > 0)[has]


def evaluation_sums(device, ce_sum: torch.Tensor, num_targets: torch.Tensor, correct: torch.Tensor | None,
                    visual: torch.Tensor | None, mtp: MtpOutput | None, mtp_depths: int) -> GlobalSums:
    """One evaluation micro-batch's sums on this rank (added over the epoch, summed over ranks once at its end):
    CE and targets, per kind (image / text documents) the documents answered exactly and all documents, and with a
    multi-token prediction module per depth its CE, targets and top-1 hits plus the depth-1 acceptance counts."""
    zero = torch.zeros((), dtype=torch.long)
    image_correct = (correct & visual).sum() if correct is not None else zero
    image_docs = visual.sum() if visual is not None else zero
    text_correct = (correct & ~visual).sum() if correct is not None else zero
    text_docs = (~visual).sum() if visual is not None else zero
    sums = GlobalSums(device, ce=ce_sum, targets=num_targets, image_correct=image_correct, image_docs=image_docs,
                      text_correct=text_correct, text_docs=text_docs)
    if mtp_depths:
        have = mtp is not None
        sums.add("mtp_ce", mtp.ce if have else 0.0, (mtp_depths,))
        sums.add("mtp_targets", mtp.num_targets if have else 0.0, (mtp_depths,))
        sums.add("mtp_correct", mtp.correct if have else 0.0, (mtp_depths,))
        sums.add("mtp_accepted", mtp.accepted if have else 0.0)
        sums.add("mtp_accept_total", mtp.accept_total if have else 0.0)
    return sums


def evaluation_metrics(sums: GlobalSums, prefix: str) -> dict[str, float]:
    """`{prefix}/loss`, `/image_acc` and `/text_acc` (when the kind occurred), `/answer_acc`, and with MTP
    `/mtp_loss` (mean over depths), `/mtp_acc_depth{d}`, `/mtp_acceptance`, from the epoch's global sums."""
    v = sums.value
    metrics = {f"{prefix}/loss": v("ce") / max(v("targets"), 1.0)}
    if v("image_docs") > 0:
        metrics[f"{prefix}/image_acc"] = v("image_correct") / v("image_docs")
    if v("text_docs") > 0:
        metrics[f"{prefix}/text_acc"] = v("text_correct") / v("text_docs")
    metrics[f"{prefix}/answer_acc"] = (v("image_correct") + v("text_correct")) / max(v("image_docs") + v("text_docs"),
                                                                                      1.0)
    if "mtp_ce" in sums:
        per_depth = list(zip(sums["mtp_ce"].tolist(), sums["mtp_targets"].tolist(), sums["mtp_correct"].tolist()))
        metrics[f"{prefix}/mtp_loss"] = sum(ce / max(n, 1.0) for ce, n, _ in per_depth) / len(per_depth)
        for d, (_, n, hits) in enumerate(per_depth, 1):
            metrics[f"{prefix}/mtp_acc_depth{d}"] = hits / max(n, 1.0)
        metrics[f"{prefix}/mtp_acceptance"] = v("mtp_accepted") / max(v("mtp_accept_total"), 1.0)
    return metrics


class EvaluationAccumulator:
    """One evaluation epoch's sums on this rank: `add` per micro-batch, `metrics` once at the end (one all-reduce)."""

    def __init__(self) -> None:
        self._sums: GlobalSums | None = None

    def add(self, out, batch, device, mtp_depths: int, cp=None) -> None:
        """`out`: the model's output on `batch` (a PackedBatch) with `label_logits_only` (and `mtp_metrics` when the
        model has MTP depths). `cp`: the context-parallel group the row was split over, if any."""
        guesses = out.logits.argmax(-1) if out.logits is not None else None
        if cp is not None and guesses is not None:
            # every rank holds the greedy answers of its slice's targets; in rank order they are the row's, which
            # one rank of the group counts
            guesses = cp.gather_rows(guesses)
            guesses = guesses if cp.rank == 0 else guesses[:0]
        correct = visual = None
        if guesses is not None and guesses.shape[0] > 0 and batch.get("cu_seqlens") is not None:
            correct, visual = document_answer_correct(guesses, batch["labels"], batch["cu_seqlens"],
                                                      batch.get("mm_token_type_ids"))
        sums = evaluation_sums(device, out.ce_loss.detach(), out.num_label_tokens, correct, visual, out.mtp,
                               mtp_depths)
        self._sums = sums if self._sums is None else self._sums + sums

    def metrics(self, prefix: str, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The epoch's metrics (global: every rank gets the same values) and a fresh start; {} without any batch."""
        if self._sums is None:
            return {}
        sums, self._sums = self._sums.reduced(sum_over_ranks), None
        return evaluation_metrics(sums, prefix)
