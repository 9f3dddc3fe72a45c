"""The vision-language forward every family shares (`VisionLanguageMoe`): the vision tower (transformers' own, per
family), the splice of its embeddings at the image / video placeholder tokens, 3-D mRoPE positions (per document
in a packed row), deepstack features where the tower has them (Qwen3-VL), then `MoeCausalLM`'s tail.

A family subclass builds `self.model` (`VisionLanguageBackbone`: `visual`, transformers' vision model with its rotary
swapped for `Fp32SafeVisionRotaryEmbedding`, and `language_model`, a `DecoderBackend`, under transformers' names),
plus `lm_head`, `config`, `text_config`.

Deepstack: the tower also returns, per deepstack layer j, one feature per merged visual token. They are added to
the decoder's hidden states after layer j at the visual positions (`decoder.Deepstack`). Images and videos are
placed by their own placeholder masks, so their features land at their own tokens whatever the order of images
and videos in the text: that is what transformers' joint image|video mask does.
"""

from __future__ import annotations

import torch
from torch import nn

from .batch import PackedBatch
from .causal_lm import MoeCausalLM, MoeOutput, reject_unknown
from .decoder import Deepstack
from .mrope_positions import IMAGE, VIDEO, mrope_position_ids, mrope_position_ids_packed, split_video_grids
from .packing import SequenceInfo, build_sequence_info
from .rotary import Fp32SafeVisionRotaryEmbedding


class VisionLanguageBackbone(nn.Module):
    """The vision tower and the text decoder under transformers' names (`visual`, `language_model`)."""

    def __init__(self, config, vision_class: type[nn.Module], text_backend_class: type[nn.Module]):
        super().__init__()
        self.visual = vision_class._from_config(config.vision_config)
        self.visual.rotary_pos_emb = Fp32SafeVisionRotaryEmbedding(config.vision_config)
        self.language_model = text_backend_class(config.text_config)


class VisionLanguageMoe(MoeCausalLM):
    TEXT_ONLY = False

    @property
    def always_run_vision(self) -> bool:
        """Sharded data parallelism (FSDP2, `ParallelContext.always_run_vision`): every rank must run the same
        modules, the same number of times, in the same order, or the ranks' all-gathers / reduce-scatters pair up
        wrongly (gloo: "Received data size doesn't match", NCCL: a hang). A rank whose micro-batch has no image then
        still runs the vision tower, on a zero placeholder whose outputs enter the embeddings times 0 (exactly
        nothing changes, and its zero gradients keep the reduce-scatter), and images and videos go through ONE
        tower call."""
        return self.parallel is not None and self.parallel.always_run_vision

    @property
    def text_model(self):
        return self.model.language_model

    def _vision_embeds(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> merged embeddings (sum t*h*w / merge^2, H) and the deepstack features (same rows; none without
        deepstack)."""
        visual = self.model.visual
        out = visual(pixels.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw)
        return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])

    def _vision_one_call(self, inputs_embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                         video_grid_thw) -> tuple[torch.Tensor, Deepstack | None]:
        """Images and videos through one vision-tower call, a zero placeholder when there are none (see
        `always_run_vision`). The tower treats every grid independently, so the outputs are the two calls'."""
        vc = self.config.vision_config
        merge = vc.spatial_merge_size
        parts = [(p, g) for p, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
                 if p is not None]
        if not parts:  # placeholder: one image of merge x merge patches (the smallest grid the merger accepts)
            row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
            pixels = inputs_embeds.new_zeros(merge * merge, row)  # (m^2, C*t*p*p)
            grid = torch.tensor([[1, merge, merge]], device=inputs_embeds.device)
            embeds, stack = self._vision_embeds(pixels, grid)
            unused = sum((s.sum() for s in stack), embeds.sum())
            return inputs_embeds + unused.to(inputs_embeds.dtype) * 0, None
        embeds, stack = self._vision_embeds(torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts]))
        positions = []
        if pixel_values is not None:
            n_image = int(image_grid_thw.prod(-1).sum()) // merge ** 2
            inputs_embeds, where = self._splice(inputs_embeds, input_ids, self.config.image_token_id,
                                                embeds[:n_image], "image")
            positions.append(where)
            embeds = embeds[n_image:]
        if pixel_values_videos is not None:
            inputs_embeds, where = self._splice(inputs_embeds, input_ids, self.config.video_token_id, embeds, "video")
            positions.append(where)
        # the features' rows are [images; videos] in tower order, as the positions
        return inputs_embeds, Deepstack(torch.cat(positions), stack) if stack else None

    def _vision_two_calls(self, inputs_embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                          video_grid_thw) -> tuple[torch.Tensor, Deepstack | None]:
        positions, stacks = [], []
        for pixels, grid, token_id, what in ((pixel_values, image_grid_thw, self.config.image_token_id, "image"),
                                             (pixel_values_videos, video_grid_thw, self.config.video_token_id,
                                              "video")):
            if pixels is None:
                continue
            embeds, stack = self._vision_embeds(pixels, grid)
            inputs_embeds, where = self._splice(inputs_embeds, input_ids, token_id, embeds, what)
            positions.append(where)
            stacks.append(stack)
        if not positions or not stacks[0]:
            return inputs_embeds, None
        return inputs_embeds, Deepstack(torch.cat(positions), [torch.cat(layer) for layer in zip(*stacks)])

    def _splice(self, inputs_embeds, input_ids, token_id, embeds, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings in at the placeholder tokens (row-major order) -> (inputs_embeds, their flat positions)."""
        mask = input_ids == token_id
        n_tokens, n_embeds = int(mask.sum()), embeds.shape[0]
        if n_tokens != n_embeds:
            raise ValueError(
                f"{what}: {n_tokens} placeholder tokens (id {token_id}) in input_ids but the vision tower produced "
                f"{n_embeds} embeddings from the grids; each {what} needs t*h*w/merge^2 placeholder tokens"
            )
        spliced = inputs_embeds.masked_scatter(mask.unsqueeze(-1), embeds.to(inputs_embeds.dtype))
        return spliced, mask.reshape(-1).nonzero().squeeze(1)

    def _mrope_positions(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                         info: SequenceInfo) -> torch.Tensor:
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
        mtp_metrics: bool = False,
        **unused,
    ) -> MoeOutput:
        if isinstance(input_ids, PackedBatch):  # model(batch, num_items_in_batch=..., ...)
            return self._forward_batch(input_ids, dict(locals()))
        reject_unknown(unused)
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
        vision = self._vision_one_call if self.always_run_vision else self._vision_two_calls
        inputs_embeds, deepstack = vision(inputs_embeds, input_ids, pixel_values, image_grid_thw,
                                          pixel_values_videos, video_grid_thw)

        B, T = inputs_embeds.shape[:2]
        info = build_sequence_info(B, T, inputs_embeds.device, cu_seqlens, attention_mask, max_seqlen, position_ids)
        if position_ids is None and (has_vision or image_grid_thw is not None or video_grid_thw is not None):
            position_ids = self._mrope_positions(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, info)
        positions = self._text_positions(position_ids, info)
        return self._decode_and_head(
            inputs_embeds, positions, info, labels=labels, output_router_logits=output_router_logits,
            label_logits_only=label_logits_only, logits_to_keep=logits_to_keep,
            num_items_in_batch=num_items_in_batch, return_logits=return_logits, deepstack=deepstack,
            mtp_metrics=mtp_metrics,
        )
