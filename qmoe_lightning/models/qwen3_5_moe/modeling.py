"""Top-level native models: `Qwen3_5MoeForConditionalGeneration` (text + image + video) and `Qwen3_5MoeForCausalLM`.

Forward takes a `PackedBatch` (`model(batch, **options)`) or transformers' keyword arguments plus `cu_seqlens` (one
packed row of documents) and returns
`MoeOutput` with `logits`, `loss` (labels given), `aux_loss` and per-layer `expert_token_counts`.

Notable choices:
- Labels follow transformers (unshifted; the model shifts). In a packed row the target of the last token of a
  document would be the first token of the next one: that target is dropped here, whatever the labels say.
- `loss = ce + router_aux_loss_coef * aux` when `output_router_logits` is true (transformers' rule; the config's
  `output_router_logits` is the default). `aux_loss` and `expert_token_counts` are returned either way; padding
  (attention_mask == 0) is excluded from both.
- `label_logits_only=True` computes the LM head only where a target exists: with a 248k vocabulary the full
  (T, V) fp32 logits dominate training memory. `logits` then has shape (num targets, V).
- `return_logits=False` (with labels) goes further: the LM head and CE run fused in row chunks
  (`lm_loss.linear_cross_entropy`), so no (T, V) tensor exists at all; `logits` is None. For training steps.
- `num_items_in_batch` (transformers' name) sums the CE and divides by it, so micro-batches of a gradient
  accumulation window and data-parallel ranks can share one token-count normaliser.
- The vision tower is transformers' own `Qwen3_5MoeVisionModel` (as NeMo Automodel reuses it), with its rotary
  swapped for an fp32-safe one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel

from ..batch import PackedBatch
from ..checkpoint import HFCheckpointMixin
from ..lm_loss import linear_cross_entropy, next_token_targets
from ..moe import GroupedExperts, TopKRouter
from ..mrope_positions import IMAGE, VIDEO, mrope_position_ids, mrope_position_ids_packed, split_video_grids
from ..packing import SequenceInfo, build_sequence_info
from ..rotary import Fp32SafeTextRotaryEmbedding, Fp32SafeVisionRotaryEmbedding
from .state_dict_adapter import Qwen3_5MoeStateDictAdapter
from .text_model import Qwen3_5MoeTextModelBackend


@dataclass
class MoeOutput:
    logits: torch.Tensor | None = None  # (B, T, V), or (num targets, V) with label_logits_only
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # transformers' load-balancing loss, pooled over layers and real tokens
    num_label_tokens: torch.Tensor | None = None  # targets that entered the CE
    expert_token_counts: torch.Tensor | None = None  # (L, E) top-k picks per expert, real tokens only
    router_logits: tuple[torch.Tensor, ...] | None = None  # per layer (B*T, E), with output_router_logits
    hidden_states: torch.Tensor | None = None  # final normed hidden states (B, T, H)


def load_balancing_loss(
    router_logits: list[torch.Tensor], indices: list[torch.Tensor], num_experts: int, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' formula: aux = E * sum_e f_e * P_e over all layers and real tokens. Also (L, E) pick counts.

    f_e = top-k picks of e / (L * N), P_e = mean router probability of e (softmax in fp32).
    """
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
    aux = num_experts * torch.sum((counts.sum(0) / rows) * (prob_sum / rows))
    return aux, counts.detach().round().long()


class _Qwen3_5MoeBase(HFCheckpointMixin, nn.Module):
    """Shared forward tail: positions, decoder, LM head, losses. Subclasses provide `text_model` and `embed`."""

    STATE_DICT_ADAPTER = Qwen3_5MoeStateDictAdapter

    def _forward_batch(self, batch: PackedBatch, arguments: dict) -> MoeOutput:
        """forward(batch, **options): the batch's tensors as keyword arguments, the call's own options beside."""
        inputs = set(PackedBatch.MODEL_INPUTS)
        doubled = sorted(k for k, v in arguments.items() if k in inputs and k != "input_ids" and v is not None)
        if doubled:
            raise TypeError(f"{doubled} given beside a PackedBatch: put them in the batch")
        options = {k: v for k, v in arguments.items() if k not in inputs and k not in ("self", "unused")}
        return self.forward(**batch.model_inputs(), **options, **arguments.get("unused", {}))

    text_config: Qwen3_5MoeTextConfig

    @property
    def text_model(self) -> Qwen3_5MoeTextModelBackend:
        raise NotImplementedError

    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after meta-device construction + `to_empty`)."""
        std = self.text_config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dim() == 2:
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
                if getattr(module, "padding_idx", None) is not None:  # as transformers: the pad row starts at 0
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, (GroupedExperts, TopKRouter)):
                module.reset_parameters(std)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

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
    ) -> MoeOutput:
        cfg = self.text_config
        hidden, router_logits, indices = self.text_model(inputs_embeds, position_ids, info)
        aux, counts = load_balancing_loss(router_logits, indices, cfg.num_experts, info.token_mask)
        if output_router_logits is None:
            output_router_logits = cfg.output_router_logits

        ce = logits = n_targets = None
        if labels is not None:
            targets = next_token_targets(labels, info.cu_seqlens if info.packed else None)  # (B, T)
            keep = targets != -100
            n_targets = keep.sum()
            if not return_logits:
                ce = linear_cross_entropy(hidden[keep], self.lm_head.weight, targets[keep])
            elif label_logits_only:
                logits = self.lm_head(hidden[keep])  # (n, V)
                ce = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            else:
                logits = self.lm_head(hidden)
                ce = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                    reduction="sum",
                )
            # a micro-batch with no target (a pack of padding only) contributes 0, not 0/0
            ce = ce / (num_items_in_batch if num_items_in_batch is not None else n_targets.clamp_min(1))
        else:
            h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(h)
        loss = None
        if ce is not None:
            loss = ce + cfg.router_aux_loss_coef * aux if output_router_logits else ce
        return MoeOutput(
            logits=logits, loss=loss, ce_loss=ce, aux_loss=aux, num_label_tokens=n_targets,
            expert_token_counts=counts, router_logits=tuple(router_logits) if output_router_logits else None,
            hidden_states=hidden,
        )


class Qwen3_5MoeForCausalLM(_Qwen3_5MoeBase):
    """Text-only model. Loads text-only and VL checkpoints (the vision tower's tensors are skipped, and counted)."""

    HF_ARCHITECTURE = "Qwen3_5MoeForCausalLM"
    MODEL_TYPES = ("qwen3_5_moe_text", "qwen3_5_moe")
    TEXT_ONLY = True

    def __init__(self, config: Qwen3_5MoeTextConfig | Qwen3_5MoeConfig):
        super().__init__()
        if isinstance(config, Qwen3_5MoeConfig):
            config = config.text_config
        self.config = self.text_config = config
        self.model = Qwen3_5MoeTextModelBackend(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def text_model(self) -> Qwen3_5MoeTextModelBackend:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        label_logits_only: bool = False,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool = True,
        mm_token_type_ids: torch.Tensor | None = None,
        **unused,
    ) -> MoeOutput:
        if isinstance(input_ids, PackedBatch):  # model(batch, num_items_in_batch=..., ...)
            return self._forward_batch(input_ids, dict(locals()))
        # the packed batches of the DataModule carry the token types (all 0 in text-only data) and, for image rows,
        # pixels: a text-only model accepts the former and refuses anything visual instead of ignoring it
        vision = sorted(k for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                        if unused.pop(k, None) is not None)
        if vision or (mm_token_type_ids is not None and bool((mm_token_type_ids != 0).any())):
            raise ValueError(f"{type(self).HF_ARCHITECTURE} is text-only, but the batch holds images or videos "
                             f"({', '.join(vision) or 'image / video token types'}): train the vision-language "
                             "model on it, or give text-only data")
        _reject_unknown(unused)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        info = build_sequence_info(B, T, inputs_embeds.device, cu_seqlens, attention_mask, max_seqlen)
        positions = self._text_positions(position_ids, info)
        return self._decode_and_head(
            inputs_embeds, positions, info, labels=labels, output_router_logits=output_router_logits,
            label_logits_only=label_logits_only, logits_to_keep=logits_to_keep,
            num_items_in_batch=num_items_in_batch, return_logits=return_logits,
        )


class Qwen3_5MoeModel(nn.Module):
    """Holds the vision tower and the text decoder under transformers' names (`visual`, `language_model`)."""

    def __init__(self, config: Qwen3_5MoeConfig):
        super().__init__()
        self.visual = Qwen3_5MoeVisionModel._from_config(config.vision_config)
        self.visual.rotary_pos_emb = Fp32SafeVisionRotaryEmbedding(config.vision_config)
        self.language_model = Qwen3_5MoeTextModelBackend(config.text_config)


class Qwen3_5MoeForConditionalGeneration(_Qwen3_5MoeBase):
    # Sharded data parallelism (FSDP2, set by parallel.parallelize_model): every rank must run the same modules,
    # the same number of times, in the same order, or the ranks' all-gathers / reduce-scatters pair up wrongly
    # (gloo: "Received data size doesn't match", NCCL: a hang). A rank whose micro-batch has no image then still
    # runs the vision tower, on a zero placeholder whose output enters the embeddings times 0 (exactly nothing
    # changes, and its zero gradients keep the reduce-scatter), and images and videos go through ONE tower call.
    always_run_vision: bool = False
    HF_ARCHITECTURE = "Qwen3_5MoeForConditionalGeneration"
    MODEL_TYPES = ("qwen3_5_moe",)  # a text-only checkpoint has no vision tower: Qwen3_5MoeForCausalLM loads it
    TEXT_ONLY = False

    def __init__(self, config: Qwen3_5MoeConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text_config
        self.model = Qwen3_5MoeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def text_model(self) -> Qwen3_5MoeTextModelBackend:
        return self.model.language_model

    def _vision_embeds(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        out = visual(pixels.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw)
        return out.pooler_output  # (sum t*h*w / merge^2, H)

    def _vision_one_call(self, inputs_embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                         video_grid_thw) -> torch.Tensor:
        """Images and videos through one vision-tower call, a zero placeholder when there are none (see
        `always_run_vision`). The tower treats every grid independently, so the embeddings are the two calls'."""
        vc = self.config.vision_config
        merge = vc.spatial_merge_size
        parts = [(p, g) for p, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
                 if p is not None]
        if not parts:  # placeholder: one image of merge x merge patches (the smallest grid the merger accepts)
            row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
            pixels = inputs_embeds.new_zeros(merge * merge, row)  # (m^2, C*t*p*p)
            grid = torch.tensor([[1, merge, merge]], device=inputs_embeds.device)
            return inputs_embeds + self._vision_embeds(pixels, grid).sum().to(inputs_embeds.dtype) * 0
        embeds = self._vision_embeds(torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts]))
        if pixel_values is not None:
            n_image = int(image_grid_thw.prod(-1).sum()) // merge ** 2
            inputs_embeds = self._splice(inputs_embeds, input_ids, self.config.image_token_id, embeds[:n_image],
                                         "image")
            embeds = embeds[n_image:]
        if pixel_values_videos is not None:
            inputs_embeds = self._splice(inputs_embeds, input_ids, self.config.video_token_id, embeds, "video")
        return inputs_embeds

    def _splice(self, inputs_embeds, input_ids, token_id, embeds, what: str) -> torch.Tensor:
        mask = input_ids == token_id
        n_tokens, n_embeds = int(mask.sum()), embeds.shape[0]
        if n_tokens != n_embeds:
            raise ValueError(
                f"{what}: {n_tokens} placeholder tokens (id {token_id}) in input_ids but the vision tower produced "
                f"{n_embeds} embeddings from the grids; each {what} needs t*h*w/merge^2 placeholder tokens"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), embeds.to(inputs_embeds.dtype))

    def _mrope_positions(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, info) -> torch.Tensor:
        cfg = self.config
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == cfg.image_token_id).long() * IMAGE
            mm_token_type_ids += (input_ids == cfg.video_token_id).long() * VIDEO
        merge = cfg.vision_config.spatial_merge_size
        if info.packed:
            return mrope_position_ids_packed(mm_token_type_ids[0], info.cu_seqlens, image_grid_thw, video_grid_thw,
                                             merge)
        # padded batch: grids are consumed row by row, padding excluded, as transformers' get_rope_index does
        images = image_grid_thw.tolist() if image_grid_thw is not None else []
        frames = split_video_grids(video_grid_thw)
        frames = frames.tolist() if frames is not None else []
        out = torch.zeros(3, info.batch_size, info.seq_len, dtype=torch.long, device=input_ids.device)
        for b in range(info.batch_size):
            keep = info.token_mask[b] if info.token_mask is not None else slice(None)
            pos, ni, nf = mrope_position_ids(mm_token_type_ids[b][keep], images, frames, merge)
            out[:, b, keep] = pos.to(out.device)
            images, frames = images[ni:], frames[nf:]
        return out

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        label_logits_only: bool = False,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool = True,
        **unused,
    ) -> MoeOutput:
        if isinstance(input_ids, PackedBatch):  # model(batch, num_items_in_batch=..., ...)
            return self._forward_batch(input_ids, dict(locals()))
        _reject_unknown(unused)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        has_vision = pixel_values is not None or pixel_values_videos is not None
        if has_vision and input_ids is None:
            raise ValueError("pixel_values need input_ids: the image/video placeholder tokens mark where they go")
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        if pixel_values_videos is not None and video_grid_thw is None:
            raise ValueError("pixel_values_videos given without video_grid_thw")
        if inputs_embeds is None:
            inputs_embeds = self.text_model.embed_tokens(input_ids)
        if self.always_run_vision:
            inputs_embeds = self._vision_one_call(inputs_embeds, input_ids, pixel_values, image_grid_thw,
                                                  pixel_values_videos, video_grid_thw)
        else:
            if pixel_values is not None:
                embeds = self._vision_embeds(pixel_values, image_grid_thw)
                inputs_embeds = self._splice(inputs_embeds, input_ids, self.config.image_token_id, embeds, "image")
            if pixel_values_videos is not None:
                embeds = self._vision_embeds(pixel_values_videos, video_grid_thw)
                inputs_embeds = self._splice(inputs_embeds, input_ids, self.config.video_token_id, embeds, "video")

        B, T = inputs_embeds.shape[:2]
        info = build_sequence_info(B, T, inputs_embeds.device, cu_seqlens, attention_mask, max_seqlen)
        if position_ids is None and (has_vision or image_grid_thw is not None or video_grid_thw is not None):
            position_ids = self._mrope_positions(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, info)
        positions = self._text_positions(position_ids, info)
        return self._decode_and_head(
            inputs_embeds, positions, info, labels=labels, output_router_logits=output_router_logits,
            label_logits_only=label_logits_only, logits_to_keep=logits_to_keep,
            num_items_in_batch=num_items_in_batch, return_logits=return_logits,
        )


def _reject_unknown(kwargs: dict) -> None:
    # transformers-style callers pass these; they carry no information for a training forward
    ignorable = {"use_cache", "return_dict", "past_key_values", "cache_position", "output_attentions",
                 "output_hidden_states"}
    unknown = set(kwargs) - ignorable
    if unknown:
        raise TypeError(f"unexpected forward argument(s): {sorted(unknown)}")
