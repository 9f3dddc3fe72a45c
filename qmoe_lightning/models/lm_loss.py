"""LM head + cross-entropy without materialising the (T, V) logits.

With Qwen3.5's 248k vocabulary, a 4K-token row has 4 GB of fp32 logits, and the usual path keeps logits, their
fp32 copy, the log-softmax and its gradient alive at once. `linear_cross_entropy` walks the rows in chunks: per
chunk it computes the logits, the summed CE, and right away the gradients w.r.t. the hidden states and the head
weight (softmax - one_hot, the same 3 matmuls as autograd would run). Backward then only scales them. Peak extra
memory is one chunk of logits plus the (V, H) weight gradient.

Numerics mirror the plain path: logits in the activation dtype then fp32 for the softmax (transformers upcasts the
same way), gradients cast back to the activation dtype for the matmuls as autograd would. Results equal
`F.cross_entropy(F.linear(h, W).float(), t, reduction="sum")` up to float summation order.

Gradients are computed in forward, so the fused function is used only when a backward will follow; without grad
the loss is computed chunk by chunk with no gradient work.

Under autocast (bf16-mixed) the head runs as autocast runs `F.linear`: hidden states and head weight in the
autocast dtype (the (V, H) head is the largest matmul of the step), softmax and loss in fp32, and the gradients
handed back in the inputs' own dtypes (the weight's accumulated in fp32, never rounded to bf16 on the way). The
matmuls write into `out=` buffers, which autocast does not touch: the casts are explicit, and the backward (which
runs outside autocast) only scales what the forward computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if compute_dtype is not None:  # autocast: both operands in its dtype, as for F.linear
            hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        # Two (c, V) buffers for the whole call, reused by every chunk: a fresh (c, V) tensor per chunk is a fresh
        # mmap on CPU (glibc maps anything over 32 MB), so its pages fault in and are zeroed by the kernel on first
        # touch -- at vocab 32k that was half the step's page faults and ~5 % of its time.
        rows = chunk_size = _even_chunk(hidden.shape[0], chunk_size)
        logits_buf = hidden.new_empty((rows, weight.shape[0]))  # (c, V) activation dtype
        logp_buf = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)  # (c, V)
        w_buf = None  # (V / 8, H) in the compute dtype, one for every chunk (below)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (c, H)
            t = targets[start : start + chunk_size]  # (c,)
            logits = torch.mm(h, weight.t(), out=logits_buf[: len(t)])  # (c, V) == F.linear(h, weight)
            # one fused pass (logsumexp + sub + exp took three), fp32 as transformers upcasts
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buf[: len(t)])
            valid = t != -100
            safe_t = t.clamp_min(0)
            total = total - (logp.gather(1, safe_t[:, None]).squeeze(1) * valid).sum()
            grad = logp.exp_()  # softmax, in place
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            if not bool(valid.all()):  # rows without a target: zeroed (a pass over (c, V) only when there are any)
                grad.mul_(valid[:, None])
            if grad.dtype != hidden.dtype:  # cast into the logits buffer (free now) rather than a new (c, V)
                grad = logits.copy_(grad)
            if need_h:
                torch.mm(grad, weight, out=grad_h[start : start + chunk_size])
            if need_w:
                if grad.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)  # accumulated in place: no (V, H) temporary per chunk
                else:
                    # the chunk's product in the compute dtype, added in place (promoted to fp32), in 8 blocks of
                    # vocabulary rows through one (V / 8, H) buffer: `(grad.t() @ h).float()` gave the same values
                    # through a fresh (V, H) and an fp32 (V, H) per chunk (2.8 GiB at Qwen3.5's vocab and hidden 2048)
                    V = weight.shape[0]
                    block = -(-V // 8)
                    if w_buf is None:
                        w_buf = torch.empty((block, weight.shape[1]), dtype=grad.dtype, device=grad.device)
                    for v0 in range(0, V, block):
                        v1 = min(v0 + block, V)
                        grad_w[v0:v1] += torch.mm(grad[:, v0:v1].t(), h, out=w_buf[: v1 - v0])
        del logits_buf, logp_buf, w_buf  # (the loop's names of them too): the conversion below must not add to them
        logits = logp = grad = None
        if grad_w is not None and ctx.dtypes[1].itemsize < grad_w.dtype.itemsize:
            # kept until backward in the weight's own dtype (bf16-true: half the (V, H) bytes, 0.95 GiB at Qwen3.5's
            # vocab and hidden 2048), accumulated in fp32 above: backward would round it to that dtype anyway (the
            # main CE's upstream gradient is 1: bitwise the same; a scaled one, e.g. an MTP depth's, within one ulp)
            grad_w = grad_w.to(ctx.dtypes[1])
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (grad_h * grad_out.to(grad_h.dtype)).to(hidden_dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed CE of `F.linear(hidden, weight)` against `targets` (-100 ignored). hidden (N, H), weight (V, H)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, autocast_dtype(hidden))
    total = hidden.new_zeros((), dtype=torch.float32)
    chunk_size = _even_chunk(hidden.shape[0], chunk_size)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = F.linear(hidden[start : start + chunk_size], weight).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk_size], ignore_index=-100,
                                        reduction="sum")
    return total


def masked_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x[keep] for x (..., H) and a boolean keep (...) -> (n, H), as a gather: boolean indexing's backward is a serial
    index_put with accumulation (~10x slower on CPU for a 3K-token row); index_select's is an index_add."""
    rows = keep.reshape(-1).nonzero().squeeze(1)  # (n,)
    return x.reshape(-1, x.shape[-1]).index_select(0, rows)


def _even_chunk(rows: int, chunk_size: int) -> int:
    """The fewest chunks of at most `chunk_size` rows, of equal size: 3089 rows in chunks of 1024 would leave a 17-row
    tail that costs a whole pass over the (V, H) head weight in each of the three matmuls."""
    chunks = max(-(-rows // chunk_size), 1)
    return max(-(-rows // chunks), 1)


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) unshifted labels (HF convention) -> (B, T) next-token targets: position t predicts labels[t + 1], the
    last position nothing, and with `cu_seqlens` (a packed row, B = 1) no target crosses a document boundary (the
    last token of every document predicts nothing). The one label shift of the project: the model's loss, the
    answer accuracy and (with `future_token_targets`) multi-token prediction use it."""
    return future_token_targets(labels, cu_seqlens, 1)


def future_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None, offset: int) -> torch.Tensor:
    """(B, T) unshifted labels -> (B, T): position t predicts labels[t + offset] when that position exists and, in a
    packed row, lies in the same document as t; else -100. offset 1: next-token targets; offset d + 2: the targets of
    multi-token prediction depth d."""
    T = labels.shape[1]
    targets = F.pad(labels[:, offset:], (0, min(offset, T)), value=-100)[:, :T]
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, T, labels.device)  # (T,)
        same = torch.zeros(T, dtype=torch.bool, device=labels.device)
        same[: max(T - offset, 0)] = doc[offset:] == doc[: T - offset] if T > offset else same[:0]
        targets = targets.masked_fill(~same.unsqueeze(0), -100)
    return targets


def document_ids(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    """(T,) index of the document each position of a packed row belongs to (positions past the last end: -1)."""
    bounds = cu_seqlens.long().to(device)
    pos = torch.arange(T, device=device)
    doc = torch.searchsorted(bounds[1:], pos, right=True)  # (T,)
    return torch.where(pos < bounds[-1], doc, torch.full_like(doc, -1))
