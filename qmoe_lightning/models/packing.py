"""Document boundaries of one forward pass, computed once and shared by every layer.

A forward is either a padded batch (B rows, optional attention_mask) or ONE packed row of N documents described by
`cu_seqlens` (int32, N+1 offsets, as flash-attention / fla take them). Everything a layer needs to keep documents
apart is derived here once, on the host, instead of once per layer:

- `pos_in_doc` (T,): restarts at 0 at every document start; the conv masks a tap k when `pos_in_doc < k`;
- the chunk layout of the chunked delta rule: every document is cut into chunks of `chunk_size` starting at its
  own first token (so chunk math for a document is exactly what it would be if it ran alone), and the chunks of
  all documents are scanned together in "waves": wave s advances chunk s of every document that has one.

Footgun: resetting only position_ids inside a packed row leaks the Gated DeltaNet conv taps and recurrent state
across documents (measured 0.26-0.40 max |logit diff| on the second document). Both resets live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class ChunkLayout:
    """Wave-major chunk layout of the delta rule (one per chunk size).

    Documents are ranked by chunk count (longest first), so the documents still running at wave s are always a
    prefix 0..n_s-1 and the chunks of wave s are one contiguous slice: the scan slices instead of gathering, and
    the recurrent state of finished documents is simply dropped.
    """

    chunk_size: int
    num_chunks: int  # total chunks over all documents
    token_slot: torch.Tensor  # (B*T,) long: flat index into (num_chunks * chunk_size) for every token
    wave_sizes: list[int]  # documents active in each wave, non-increasing
    doc_order: list[int]  # documents by slot rank (longest first): the state rows of wave 0 are doc_order[:n0]


@dataclass
class SequenceInfo:
    batch_size: int
    seq_len: int
    cu_seqlens: torch.Tensor | None  # (N+1,) int32 when packed (batch_size == 1)
    max_seqlen: int
    pos_in_doc: torch.Tensor  # (B, T) long
    token_mask: torch.Tensor | None  # (B, T) bool: real tokens (None: all real)
    _chunk_layouts: dict[int, ChunkLayout] = field(default_factory=dict)
    # context parallelism: this rank's slice of a row split over ranks (`context_parallel.ContextSlice`); the other
    # fields then describe the local slice (its document segments), and the layers that look across the slice
    # boundary (attention, the Gated DeltaNet conv and state) exchange what they need through it
    cp: object | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @cached_property
    def all_bounds(self) -> list[tuple[int, int]]:
        """(start, end) of every document, empty ones included (one host sync per forward, shared by layers)."""
        if self.cu_seqlens is None:
            return [(0, self.seq_len)]
        cu = self.cu_seqlens.tolist()
        return list(zip(cu[:-1], cu[1:]))

    @cached_property
    def doc_bounds(self) -> list[tuple[int, int]]:
        """Non-empty documents only."""
        return [(s, e) for s, e in self.all_bounds if e > s]

    @cached_property
    def seq_idx(self) -> torch.Tensor | None:
        """(1, T) int32 document index of every token (causal-conv1d's document-boundary input); None unpacked."""
        if self.cu_seqlens is None:
            return None
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        return idx.to(torch.int32).unsqueeze(0)

    def chunk_layout(self, chunk_size: int) -> ChunkLayout:
        if chunk_size not in self._chunk_layouts:
            self._chunk_layouts[chunk_size] = _build_chunk_layout(self, chunk_size)
        return self._chunk_layouts[chunk_size]


def build_sequence_info(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> SequenceInfo:
    """position_ids: with no `cu_seqlens` and no mask, text positions that restart mark packed documents
    (`cu_seqlens_from_positions`, transformers' convention)."""
    cu_seqlens = cu_seqlens_from_positions(position_ids, cu_seqlens, attention_mask)
    token_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, seq_len):
            raise ValueError(
                f"attention_mask must be a 2-D (batch, seq) padding mask of shape {(batch_size, seq_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        token_mask = attention_mask.bool()
        if bool(token_mask.all()):
            token_mask = None
    if cu_seqlens is None:
        pos = torch.arange(seq_len, device=device).expand(batch_size, -1)
        return SequenceInfo(batch_size, seq_len, None, seq_len, pos, token_mask)

    if batch_size != 1:
        raise ValueError(f"cu_seqlens describes ONE packed row; got a batch of {batch_size} rows")
    cu = cu_seqlens.reshape(-1).to(device=device, dtype=torch.int32)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must be non-decreasing offsets from 0 to the row length {seq_len}, got {cu.tolist()}"
        )
    lengths = (cu[1:] - cu[:-1]).long()
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)  # (T,) start of each token's document
    pos = (torch.arange(seq_len, device=device) - starts).unsqueeze(0)
    longest = int(lengths.max()) if max_seqlen is None else int(max_seqlen)
    return SequenceInfo(1, seq_len, cu, longest, pos, token_mask)


def cu_seqlens_from_positions(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                              attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' packed-by-positions convention: with no `cu_seqlens` and no attention mask, text positions
    (B, T) -- or the text row of (4, B, T) -- that do not step by one start a new document (transformers then builds
    a block-diagonal mask; `find_packed_sequence_indices`). Returns the `cu_seqlens` of such a row (B = 1), else the
    given `cu_seqlens`. Without this, restarting positions would only move the rotary while attention still crossed
    documents. (3, B, T) mRoPE positions carry no text row: as transformers, no detection there.)"""
    if cu_seqlens is not None or attention_mask is not None or position_ids is None:
        return cu_seqlens
    if position_ids.dim() == 2:
        text = position_ids
    elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
        text = position_ids[0]
    else:
        return None
    restarts = torch.diff(text, dim=-1) != 1  # (B, T-1)
    if not bool(restarts.any()):
        return None
    if text.shape[0] != 1:
        raise ValueError("position_ids restart inside rows of a batch of several rows (packed documents): pack one "
                         "row per batch and pass cu_seqlens, or pad the documents with an attention_mask")
    starts = restarts[0].nonzero().squeeze(1) + 1
    T = text.shape[1]
    return torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)]).to(torch.int32)


def _build_chunk_layout(info: SequenceInfo, chunk_size: int) -> ChunkLayout:
    device = info.pos_in_doc.device
    lengths = [e - s for s, e in info.all_bounds] if info.packed else [info.seq_len] * info.batch_size
    chunks_per_doc = [(n + chunk_size - 1) // chunk_size for n in lengths]
    order = sorted(range(len(lengths)), key=lambda d: -chunks_per_doc[d])  # stable: ties keep document order
    rank = [0] * len(lengths)
    for r, d in enumerate(order):
        rank[d] = r
    max_chunks = max(chunks_per_doc, default=0)
    wave_sizes = [sum(1 for c in chunks_per_doc if c > s) for s in range(max_chunks)]
    wave_offsets = [0]
    for n in wave_sizes[:-1]:
        wave_offsets.append(wave_offsets[-1] + n)

    # token at position p of document d -> chunk (d, p // C) -> slot wave_offsets[p // C] + rank[d]
    doc_of_token = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device, dtype=torch.long)
    )
    p = info.pos_in_doc.reshape(-1)
    wave = p // chunk_size
    offsets = torch.tensor(wave_offsets or [0], device=device, dtype=torch.long)
    ranks = torch.tensor(rank or [0], device=device, dtype=torch.long)
    token_slot = (offsets[wave] + ranks[doc_of_token]) * chunk_size + p % chunk_size
    return ChunkLayout(chunk_size, sum(chunks_per_doc), token_slot, wave_sizes, order)
