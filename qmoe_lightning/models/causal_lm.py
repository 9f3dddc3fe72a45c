"""The forward tail every native model shares (`MoeCausalLM`): a `PackedBatch` or transformers' keyword arguments
in, positions, the decoder, the LM head and the losses out (`MoeOutput`).

Notable choices:
- Labels follow transformers (unshifted; the model shifts). In a packed row the target of the last token of a
  document would be the first token of the next one: that target is dropped here, whatever the labels say.
- `loss = ce + router_aux_loss_coef * aux` when `output_router_logits` is true (transformers' rule; the config's
  `output_router_logits` is the default). `aux_loss` and `expert_token_counts` are returned either way; padding
  (attention_mask == 0) is excluded from both. Only MoE layers route: a dense layer has no row in either.
- `label_logits_only=True` computes the LM head only where a target exists: with a 150k-250k vocabulary the full
  (T, V) fp32 logits dominate training memory. `logits` then has shape (num targets, V).
- `return_logits=False` (with labels) goes further: the LM head and CE run fused in row chunks
  (`lm_loss.linear_cross_entropy`), so no (T, V) tensor exists at all; `logits` is None. For training steps.
- `num_items_in_batch` (transformers' name) sums the CE and divides by it, so micro-batches of a gradient
  accumulation window and data-parallel ranks can share one token-count normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batch import PackedBatch
from .checkpoint import HFCheckpointMixin
from .decoder import DecoderBackend, Deepstack
from .lm_loss import future_token_targets, linear_cross_entropy, masked_rows, next_token_targets
from .moe import GroupedExperts, TopKRouter
from .mtp import MtpOutput, MultiTokenPredictor, shifted_embeddings
from .packing import SequenceInfo
from .parallel_context import WHOLE_ROW, ParallelContext
from .rotary import Fp32SafeTextRotaryEmbedding, Fp32SafeVisionRotaryEmbedding


@dataclass
class MoeOutput:
    logits: torch.Tensor | None = None  # (B, T, V), or (num targets, V) with label_logits_only
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # transformers' load-balancing loss, pooled over layers and real tokens
    num_label_tokens: torch.Tensor | None = None  # targets that entered the CE
    # targets of the whole row: num_label_tokens, except for a row split over context-parallel ranks (whose
    # num_label_tokens, logits, hidden states and router outputs are this rank's slice's)
    row_label_tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None  # (B, T) real tokens of the positions the outputs cover (None: all)
    expert_token_counts: torch.Tensor | None = None  # (L, E) top-k picks per expert, real tokens only
    router_logits: tuple[torch.Tensor, ...] | None = None  # per layer (B*T, E), with output_router_logits
    hidden_states: torch.Tensor | None = None  # final normed hidden states (B, T, H)
    mtp: MtpOutput | None = None  # multi-token prediction (a model with `mtp`, labels given)


def load_balancing_loss(
    router_logits: list[torch.Tensor], indices: list[torch.Tensor], num_experts: int, token_mask: torch.Tensor | None,
    row_sums=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' formula: aux = E * sum_e f_e * P_e over all layers and real tokens. Also (L, E) pick counts.

    f_e = top-k picks of e / (L * N), P_e = mean router probability of e (softmax in fp32).
    row_sums (context parallelism, the row split over ranks: `RowSplit.row_sums`): f, P and N are the whole row's. aux is linear in the
    probability sums once f is fixed (f has no gradient), so rank r's share E * sum_e f_e * P_e^(r) sums to aux over
    the ranks: the value returned is the row's aux on every rank, its gradient this rank's share only (summed over
    the ranks by the gradient reduction, as every other per-token term). The counts stay this rank's.
    """
    if not router_logits:  # a config without any MoE layer (every layer dense)
        device = token_mask.device if token_mask is not None else None
        return torch.zeros((), device=device), torch.zeros(0, num_experts, dtype=torch.long, device=device)
    counts, prob_sum = [], 0.0
    mask = None if token_mask is None else token_mask.reshape(-1).float()  # (N,)
    for logits, idx in zip(router_logits, indices):
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        if mask is None:
            # explicit fp32: under bf16-true Lightning makes bf16 the default dtype, which cannot count past 256
            picks = torch.zeros(num_experts, device=logits.device, dtype=torch.float32).index_add_(
                0, idx.reshape(-1), torch.ones(idx.numel(), device=logits.device, dtype=torch.float32)
            )
            prob_sum = prob_sum + probs.sum(0)
        else:
            picks = torch.zeros(num_experts, device=logits.device, dtype=torch.float32).index_add_(
                0, idx.reshape(-1), mask.repeat_interleave(idx.shape[-1])
            )
            prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
        counts.append(picks)
    counts = torch.stack(counts)  # (L, E)
    rows = len(router_logits) * (router_logits[0].shape[0] if mask is None else mask.sum())
    if row_sums is None:
        aux = num_experts * torch.sum((counts.sum(0) / rows) * (prob_sum / rows))
        return aux, counts.detach().round().long()
    # the row's pick counts, probability sums and token count in one collective
    E = num_experts
    totals = row_sums(torch.cat([counts.sum(0), prob_sum.detach(),
                                            torch.as_tensor(rows, dtype=counts.dtype, device=counts.device).reshape(1)]))
    row_counts, row_probs, row_rows = totals[:E], totals[E:2 * E], totals[-1]
    share = E * torch.sum((row_counts / row_rows) * (prob_sum / row_rows))
    row_aux = E * torch.sum((row_counts / row_rows) * (row_probs / row_rows))
    aux = share + (row_aux - share).detach()
    return aux, counts.detach().round().long()


class MoeCausalLM(HFCheckpointMixin, nn.Module):
    """Base of every native model: batch unpacking, init, positions, the decoder, LM head and losses.
    Subclasses provide `text_model` (a `DecoderBackend`), `lm_head`, `text_config` and the class attributes
    `HFCheckpointMixin` asks for."""

    def _forward_batch(self, batch: PackedBatch, arguments: dict) -> MoeOutput:
        """forward(batch, **options): the batch's tensors as keyword arguments, the call's own options beside."""
        inputs = set(PackedBatch.MODEL_INPUTS)
        doubled = sorted(k for k, v in arguments.items() if k in inputs and k != "input_ids" and v is not None)
        if doubled:
            raise TypeError(f"{doubled} given beside a PackedBatch: put them in the batch")
        options = {k: v for k, v in arguments.items() if k not in inputs and k not in ("self", "unused")}
        return self.forward(**batch.model_inputs(), **options, **arguments.get("unused", {}))

    text_config: object
    # the multi-token prediction module, in families whose checkpoints carry one and only when asked for
    # (`ModelFamily.supports_mtp`; the subclass builds it after this __init__); None everywhere else. Set on the
    # instance, never as a class default: nn.Module keeps submodules in `_modules`, so a class attribute `mtp = None`
    # would shadow the module a subclass registers.
    mtp: MultiTokenPredictor | None
    # how the model was parallelised (`parallel.parallelize_model` sets it once); None: one device
    parallel: ParallelContext | None

    def __init__(self) -> None:
        super().__init__()
        self.mtp = None
        self.parallel = None

    @property
    def text_model(self) -> DecoderBackend:
        raise NotImplementedError

    def add_mtp(self, layers: int, loss_scale: float, block_factory, norm_class: type[nn.Module]) -> None:
        """Build the MTP module (`mtp.*`) with `layers` depths of `block_factory(text_config, depth)` blocks and the
        family's norm (0 layers: none), its loss weighted by `loss_scale`. A family with `supports_mtp` calls it at
        the end of its `__init__`."""
        self.mtp = MultiTokenPredictor(self.text_config, layers, block_factory, norm_class) if layers else None
        self.mtp_loss_scale = loss_scale

    def set_activation_checkpointing(self, on: bool) -> None:
        """Every decoder block (those of the MTP module too) recomputes itself in backward, routing replayed
        (`decoder.DecoderBlock`), or none does."""
        self.text_model.gradient_checkpointing = on
        for block in self.mtp.layers if self.mtp is not None else []:
            block.checkpointing = bool(on)

    def routers(self) -> list[TopKRouter]:
        """The routers of the MoE decoder layers, in layer order: row i of `expert_token_counts` is routers()[i]."""
        text = self.text_model
        return [text.layers[i].mlp.gate for i in text.moe_layers]

    def init_weights(self, root: nn.Module | None = None) -> None:
        """Initialise every parameter and buffer of `root` (default the whole model) in place (after meta-device
        construction + `to_empty`)."""
        std = self.text_config.initializer_range
        for module in (root if root is not None else self).modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dim() == 2:
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:  # as transformers: pad row 0
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, (GroupedExperts, TopKRouter)):
                module.reset_parameters(std)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def tie_weights(self) -> None:
        """lm_head shares the input embedding when the config says so. Called by `__init__`, and again after
        `to_empty` (meta -> device), which gives every module a parameter of its own."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary inv_freq), which checkpoints do not hold."""
        for module in self.modules():
            if isinstance(module, (Fp32SafeTextRotaryEmbedding, Fp32SafeVisionRotaryEmbedding)):
                module.reset_parameters()

    def _text_positions(self, position_ids, info: SequenceInfo) -> torch.Tensor:
        if position_ids is None:
            return info.pos_in_doc.unsqueeze(0).expand(3, -1, -1)
        if position_ids.dim() == 2:  # (B, T) text positions
            return position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # transformers' [text; t; h; w]
            return position_ids[1:]
        if position_ids.dim() == 3 and position_ids.shape[0] == 3:
            return position_ids
        raise ValueError(f"position_ids must be (B, T), (3, B, T) or (4, B, T); got {tuple(position_ids.shape)}")

    def _decode_and_head(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        info: SequenceInfo,
        *,
        labels: torch.Tensor | None,
        output_router_logits: bool | None,
        label_logits_only: bool,
        logits_to_keep: int,
        num_items_in_batch: torch.Tensor | int | None,
        return_logits: bool = True,
        deepstack: Deepstack | None = None,
        mtp_metrics: bool = False,
    ) -> MoeOutput:
        cfg = self.text_config
        targets = None if labels is None else next_token_targets(labels, info.cu_seqlens if info.packed else None)
        row_targets = None if targets is None else (targets != -100).sum()
        whole = (inputs_embeds, info)  # the row before a context-parallel split (multi-token prediction reads it)
        rows = self.rows
        if rows.size > 1 and labels is None and logits_to_keep:
            raise ValueError("logits_to_keep (generation) with the row split over context-parallel ranks: each rank "
                             "holds its own slice's last tokens, not the row's; generate without cp")
        # this rank's part of the row from here on (the whole row on one device)
        inputs_embeds, position_ids, info, targets, deepstack = rows.split(
            inputs_embeds, position_ids, info, targets, deepstack, min_slice=self.min_context_slice)
        rope = self.text_model.rotary_emb(inputs_embeds, position_ids)  # the decoder's and the MTP block's
        hidden, router_logits, indices = self.text_model(inputs_embeds, rope, info, deepstack)
        aux, counts = load_balancing_loss(router_logits, indices, cfg.num_experts, info.token_mask,
                                          row_sums=rows.row_sums if rows.size > 1 else None)
        if output_router_logits is None:
            output_router_logits = cfg.output_router_logits

        ce = logits = n_targets = None
        if labels is not None:
            keep = targets != -100
            n_targets = keep.sum()
            if not return_logits:
                ce = linear_cross_entropy(masked_rows(hidden, keep), self.lm_head.weight, targets[keep])
            elif label_logits_only:
                logits = self.lm_head(masked_rows(hidden, keep))  # (n, V)
                ce = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            else:
                logits = self.lm_head(hidden)
                ce = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                    reduction="sum",
                )
            # a micro-batch with no target (a pack of padding only) contributes 0, not 0/0
            normaliser = num_items_in_batch if num_items_in_batch is not None else row_targets.clamp_min(1)
            ce = ce / normaliser
        else:
            h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(h)
        mtp = None
        if labels is not None and self.mtp is not None:
            mtp = self._multi_token_prediction(whole, hidden, rope, info, labels, normaliser,
                                               fused=not return_logits, metrics=mtp_metrics)
        loss = None
        if ce is not None:
            loss = ce + cfg.router_aux_loss_coef * aux if output_router_logits else ce
            if mtp is not None:
                loss = loss + self.mtp_loss_scale * mtp.ce.mean()
        return MoeOutput(
            logits=logits, loss=loss, ce_loss=ce, aux_loss=aux, num_label_tokens=n_targets,
            row_label_tokens=row_targets, token_mask=info.token_mask,
            expert_token_counts=counts, router_logits=tuple(router_logits) if output_router_logits else None,
            hidden_states=hidden, mtp=mtp,
        )

    @property
    def rows(self):
        """How each packed row is divided among ranks (`parallel_context.RowSplit`; whole rows on one device)."""
        return self.parallel.rows if self.parallel is not None else WHOLE_ROW

    @property
    def min_context_slice(self) -> int:
        return self.text_model.min_context_slice

    def context_parallel_group(self):
        """The ranks sharing each row (set by `parallel.parallelize_model`), None when rows stay on one rank."""
        return self.rows.group

    def _multi_token_prediction(self, whole, hidden, rope, info: SequenceInfo, labels, normaliser,
                                *, fused: bool, metrics: bool) -> MtpOutput:
        """Every depth of `self.mtp` (see mtp.py): per-depth summed CE over the same normaliser as the main CE; the
        MTP block attends at the main model's positions (`rope` is the decoder's). `whole` = (inputs_embeds, info)
        of the whole row: the shifted embeddings and the targets cross a context-parallel slice's end."""
        row_embeds, row_info = whole
        cu = row_info.cu_seqlens if row_info.packed else None
        split = self.rows
        weight = self.lm_head.weight
        ces, counts, correct, states = [], [], [], []
        accepted = accept_total = None
        h = hidden
        for d in range(self.mtp.num_depths):
            embeds = split.local(info, shifted_embeddings(row_embeds, row_info, d + 1), 1)
            h = self.mtp(embeds, h, rope, info, d)  # (B, T, H)
            states.append(h)
            targets = split.local(info, future_token_targets(labels, cu, d + 2), 1, -100)
            if info.token_mask is not None:  # a padding position predicts nothing (left padding)
                targets = targets.masked_fill(~info.token_mask, -100)
            keep = targets != -100
            rows, want = masked_rows(h, keep), targets[keep]
            if fused:
                ce = linear_cross_entropy(rows, weight, want)
            else:
                ce = F.cross_entropy(self.lm_head(rows).float(), want, reduction="sum")
            ces.append(ce / normaliser)
            counts.append(keep.sum())
            if metrics:
                with torch.no_grad():
                    guess = argmax_rows(rows, weight)
                    correct.append((guess == want).sum())
                    if d == 0:  # the main model one step later: position t + 1 (same document: t + 2 is)
                        B, T, H = hidden.shape
                        after = split.hidden_after(hidden)  # (1, H) the next rank's first, zeros at the end
                        rows_after = torch.cat([hidden.detach().reshape(B * T, H), after])
                        nxt = keep.reshape(-1).nonzero().squeeze(1) + 1
                        accepted = (guess == argmax_rows(rows_after[nxt], weight)).sum()
                        accept_total = keep.sum()
        return MtpOutput(torch.stack(ces), torch.stack(counts), torch.stack(correct) if metrics else None,
                         accepted, accept_total, tuple(states))


def argmax_rows(h: torch.Tensor, weight: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """argmax of `h @ weight.T` row by row in chunks (no (N, V) tensor for long rows)."""
    return torch.cat([(h[i: i + chunk] @ weight.t()).argmax(-1) for i in range(0, h.shape[0], chunk)]) \
        if h.shape[0] else torch.zeros(0, dtype=torch.long, device=h.device)


def reject_unknown(kwargs: dict) -> None:
    # transformers-style callers pass these; they carry no information for a training forward
    ignorable = {"use_cache", "return_dict", "past_key_values", "cache_position", "output_attentions",
                 "output_hidden_states"}
    unknown = set(kwargs) - ignorable
    if unknown:
        raise TypeError(f"unexpected forward argument(s): {sorted(unknown)}")
