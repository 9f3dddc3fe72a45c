"""Held-out answer accuracy on packed rows: exact match of the greedy (argmax) answer, per document.

A document counts as correct when the argmax prediction equals the target at every one of its target positions
(the assistant answer and its `<|im_end|>`). Under teacher forcing that is exactly "greedy decoding from the
prompt reproduces the answer and stops": if every next-token argmax along the reference answer is the reference
token, greedy generation follows the same path. One forward per packed row instead of one generate per question.

Documents are split into image documents (any image/video placeholder in the document) and text documents, so the
bundled image questions (colour / shape / left-right / top-bottom, chance 1/4, 1/3, 1/2, 1/2) are reported apart
from the text tasks.

Targets follow the model: labels shifted left by one, the last token of every document has no target.
"""

from __future__ import annotations

import torch

from .models.lm_loss import next_token_targets


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
