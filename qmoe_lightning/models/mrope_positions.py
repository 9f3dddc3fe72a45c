"""3-D (temporal, height, width) rotary positions for Qwen3.5 / Qwen3-VL token streams.

Same semantics as transformers' `Qwen3_5MoeModel.get_rope_index`, written for one document at a time so that a
packed row restarts positions at 0 for every document (`mrope_position_ids_packed`):

- text tokens advance all three axes together;
- an image (merged grid t, h, w) placed at running position s gets T = s + t_idx, H = s + row, W = s + col, and
  the running position then advances by max(h, w);
- a video is split per frame (Qwen3.5 separates frames by timestamp text), each frame handled like an image.

Footgun: transformers groups *consecutive* tokens of one modality and takes one grid per group, so two images
with no token between them would silently share one grid there. Here a vision run consumes as many grids as its
token count needs, which is the same whenever the chat template puts vision_start/end tokens around each image
(it always does) and correct when it does not.
"""

from __future__ import annotations

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def split_video_grids(video_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
    """(V, 3) -> (sum t, 3): one grid of t=1 per frame, as get_rope_index does."""
    if video_grid_thw is None:
        return None
    grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    grids[:, 0] = 1
    return grids


def _vision_positions(start: int, grid: list[int], merge: int) -> torch.Tensor:
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt + start, hh + start, ww + start]).reshape(3, -1)  # (3, t*h*w)


def mrope_position_ids(
    mm_token_type_ids: torch.Tensor,
    image_grids: list[list[int]] | None,
    frame_grids: list[list[int]] | None,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int, int]:
    """Positions of ONE document.

    mm_token_type_ids: (T,) 0 text, 1 image, 2 video.
    image_grids / frame_grids: (t, h, w) in patches, in order of appearance (frames already split per frame).
    Returns (positions (3, T) long, images consumed, frames consumed).
    """
    types = mm_token_type_ids.tolist()
    grids = {IMAGE: image_grids or [], VIDEO: frame_grids or []}
    used = {IMAGE: 0, VIDEO: 0}
    merge2 = spatial_merge_size * spatial_merge_size
    pieces: list[torch.Tensor] = []
    pos, i, n = 0, 0, len(types)
    while i < n:
        kind = types[i]
        j = i
        while j < n and types[j] == kind:
            j += 1
        if kind == TEXT:
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:
            remaining = j - i
            while remaining > 0:
                if used[kind] >= len(grids[kind]):
                    name = "image" if kind == IMAGE else "video frame"
                    raise ValueError(f"more {name} tokens than {name} grids were given (grids: {len(grids[kind])})")
                grid = [int(x) for x in grids[kind][used[kind]]]
                used[kind] += 1
                count = grid[0] * grid[1] * grid[2] // merge2
                if count > remaining:
                    raise ValueError(
                        f"a run of {remaining} vision tokens cannot hold a grid {grid} of {count} merged tokens"
                    )
                pieces.append(_vision_positions(pos, grid, spatial_merge_size))
                pos += max(grid[1], grid[2]) // spatial_merge_size
                remaining -= count
        i = j
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), 0, 0
    return torch.cat(pieces, dim=1), used[IMAGE], used[VIDEO]


def mrope_position_ids_packed(
    mm_token_type_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Positions of one packed row: (T,) types + cu_seqlens (N+1,) -> (3, 1, T), restarting per document.

    Grids are consumed in order across documents (the order the processor / packer concatenated them).
    """
    types = mm_token_type_ids.reshape(-1)
    total = types.numel()
    bounds = [0, total] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    images = image_grid_thw.tolist() if image_grid_thw is not None else []
    frames = split_video_grids(video_grid_thw)
    frames = frames.tolist() if frames is not None else []
    out = torch.zeros(3, total, dtype=torch.long)
    img_at, frame_at = 0, 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos, ni, nf = mrope_position_ids(types[start:end], images[img_at:], frames[frame_at:], spatial_merge_size)
        out[:, start:end] = pos
        img_at += ni
        frame_at += nf
    if img_at != len(images) or frame_at != len(frames):
        raise ValueError(
            f"grids left unused: {len(images) - img_at} image grid(s), {len(frames) - frame_at} video frame grid(s);"
            " the number of vision tokens does not match image_grid_thw / video_grid_thw"
        )
    return out.unsqueeze(1).to(mm_token_type_ids.device)
