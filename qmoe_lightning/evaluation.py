"""Held-out answer accuracy on packed rows: exact match of the greedy (argmax) answer, per document.

A document counts as correct when the argmax prediction equals the target at every one of its target positions
(the assistant answer and its `<|im_end|>`). Under teacher forcing that is exactly "greedy decoding from the
prompt reproduces the answer and stops": if every next-token argmax along the reference answer is the reference
token, greedy generation follows the same path. One forward per packed row instead of one generate per question.

Documents are split into image documents (any image/video placeholder in the document) and text documents, so the
bundled image questions (colour / shape / left-right / top-bottom, chance 1/4, 1/3, 1/2, 1/2) are reported apart
from the text tasks.

Targets follow the model: labels shifted left by one, the last token of every document has no target.

`evaluation_sums` / `evaluation_metrics`: what validation and test add up per micro-batch (named fields, one
all-reduce at the end of the epoch) and the metrics logged from the global sums.
"""

from __future__ import annotations

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
