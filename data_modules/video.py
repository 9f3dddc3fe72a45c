"""Video input without torchvision: what transformers' `Qwen3VLVideoProcessor` does, in torch + PIL.

transformers 5.23 maps `qwen3_5` / `qwen3_5_moe` to `Qwen3VLProcessor` with `Qwen3VLVideoProcessor`, which needs
torchvision (not a dependency here: on PyPI it pulls a multi-GB CUDA torch). This module reproduces its pipeline
step by step (sources: `transformers/models/qwen3_vl/video_processing_qwen3_vl.py`, `video_processing_utils.py`,
`image_processing_backends.TorchvisionBackend`, torchvision's `resize_image`):

1. Inputs. A video item is a list of frame image paths, a directory of frames (its image files, sorted by name), or
   an encoded video file. Frames are decoded like `load_image_as_tensor` (EXIF orientation applied, RGB, alpha
   dropped; 16-bit and float frames scaled to 8 bits first, `images.to_8bit`, where PIL would clip them). Frame
   lists are used whole: transformers refuses to sample frames from a list of images, so its processor needs
   `do_sample_frames=False` for them and every given frame is kept. Encoded files are decoded with PyAV when it is
   importable (transformers' `read_video_pyav`: container frame count and average rate) and sampled with
   `Qwen3VLVideoProcessor.sample_frames` when the config has `do_sample_frames` (all frames otherwise); without a
   decoder such rows are bad samples (`video_decoder_missing`). `http(s)://` references are refused (not fetched).
2. Resize to `smart_resize(num_frames, h, w, temporal_factor=temporal_patch_size, factor=patch*merge, min_pixels=
   size.shortest_edge, max_pixels=size.longest_edge)` (transformers' own function; the per-frame cap when
   `cap_pixels_per_frame`), with torchvision's tensor resize: `interpolate(..., antialias=True)` on uint8 (native
   uint8 on CPU for bicubic, and for bilinear with AVX2; float32 + clamp/round otherwise). Skipped when the size is
   unchanged, as torchvision does.
3. Fused rescale + normalise in float32: (x - mean/rescale) / (std/rescale), as `rescale_and_normalize`.
4. Pad the frame count to a multiple of temporal_patch_size with copies of the last frame, then patchify with the
   exact view/permute of `Qwen3VLVideoProcessor.patchify`: rows ordered (t, h-block, w-block, merge-row, merge-col),
   each row (channel, temporal, patch-row, patch-col) flattened. grid = (t / temporal, h / patch, w / patch).

Timestamps (the `<t seconds>` text before each frame group) are computed by the processor's own
`Qwen3VLProcessor._calculate_timestamps` from the frame indices and the metadata fps: for frame lists the fps is the
item's `"fps"` key when given, else transformers' fallback of 24 (what it uses when no `video_metadata` is passed).

The config is resolved like `BaseVideoProcessor.get_video_processor_dict`: `processor_config.json["video_processor"]`,
else `video_preprocessor_config.json`, else `preprocessor_config.json`; missing keys take the class defaults of
`Qwen3VLVideoProcessor` (read from the class, so they follow transformers).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import to_8bit

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# PIL resample codes (transformers' PILImageResampling) -> torch interpolate mode, as transformers'
# pil_torch_interpolation_mapping sends them to torchvision.
_INTERPOLATION = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_EXIF_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


URL_PREFIXES = ("http://", "https://")
NOT_FETCHED = "URLs are not fetched; download the file and give its path"


def is_url(ref) -> bool:
    """An http(s) reference: refused with NOT_FETCHED (nothing is downloaded), never looked up as a local path."""
    return isinstance(ref, str) and ref.lower().startswith(URL_PREFIXES)


class VideoError(Exception):
    """A video that cannot be used; `reason` is one of the skip reasons of `data_modules.encoding`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# Reasons (the names are re-exported by encoding.py next to the other skip reasons).
MISSING_VIDEO = "missing_video"
CORRUPT_VIDEO = "corrupt_video"
VIDEO_TOO_SHORT = "video_too_short"
VIDEO_DECODER_MISSING = "video_decoder_missing"


def _class_defaults() -> dict:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as C

    return dict(size=dict(C.size), patch_size=C.patch_size, temporal_patch_size=C.temporal_patch_size,
                merge_size=C.merge_size, image_mean=list(C.image_mean), image_std=list(C.image_std),
                rescale_factor=1 / 255, do_resize=C.do_resize, do_rescale=C.do_rescale, do_normalize=C.do_normalize,
                resample=int(C.resample), fps=C.fps, num_frames=C.num_frames, min_frames=C.min_frames,
                max_frames=C.max_frames, do_sample_frames=C.do_sample_frames,
                cap_pixels_per_frame=C.cap_pixels_per_frame, max_video_tokens=C.max_video_tokens)


@dataclass(frozen=True)
class VideoConfig:
    """The video processor settings that change pixels, grids or sampled frames."""

    size: dict = field(default_factory=dict)
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = 3
    fps: float | None = 2
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool | None = None
    max_video_tokens: int = 768

    @classmethod
    def from_model_dir(cls, model_dir: str, min_pixels: int | None = None, max_pixels: int | None = None):
        """Settings of `model_dir`'s video processor (see the module docstring), with optional pixel bounds."""
        values = _class_defaults()
        # Present keys win, explicit nulls included (fps / num_frames / cap_pixels_per_frame: None means something).
        values.update({k: v for k, v in _config_dict(model_dir).items() if k in values})
        values["image_mean"], values["image_std"] = tuple(values["image_mean"]), tuple(values["image_std"])
        size = dict(values["size"])
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        values["size"] = size
        return cls(**values)

    @property
    def bounds(self) -> tuple[int, int]:
        return int(self.size["shortest_edge"]), int(self.size["longest_edge"])

    def resized_hw(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Frame size after `Qwen3VLVideoProcessor.resize` (same arguments, transformers' smart_resize)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        min_pixels, max_pixels = self.bounds
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, max_pixels // num_frames), int(min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize(num_frames=num_frames, height=height, width=width, temporal_factor=self.temporal_patch_size,
                            factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)

    def grid(self, num_frames: int, height: int, width: int) -> list[int]:
        """video_grid_thw of a clip of num_frames frames of height x width pixels."""
        h, w = self.resized_hw(num_frames, height, width)
        t = -(-num_frames // self.temporal_patch_size)
        return [t, h // self.patch_size, w // self.patch_size]

    def sample_indices(self, total_num_frames: int, video_fps: float | None) -> list[int]:
        """Frame indices an encoded video is sampled at (`Qwen3VLVideoProcessor.sample_frames`, called as is)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        from transformers.video_utils import VideoMetadata

        if not self.do_sample_frames:
            return list(range(total_num_frames))
        meta = VideoMetadata(total_num_frames=total_num_frames, fps=video_fps)
        owner = SimpleNamespace(fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames)
        fps = None if self.num_frames is not None else self.fps
        idx = Qwen3VLVideoProcessor.sample_frames(owner, meta, num_frames=self.num_frames, fps=fps)
        return [int(i) for i in idx]


def _config_dict(model_dir: str) -> dict:
    proc = os.path.join(model_dir, "processor_config.json")
    if os.path.isfile(proc):
        with open(proc) as f:
            nested = json.load(f).get("video_processor")
        if isinstance(nested, dict):
            return nested
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return {}


# ---------------------------------------------------------------------------------------------- sources
def resolve_video(ref, base_dir: str) -> dict:
    """A row's `"video"` value -> {"frames": [abs paths]} or {"file": abs path}. Raises VideoError."""

    def absolute(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(base_dir, p)

    if isinstance(ref, (list, tuple)):
        if not ref or not all(isinstance(p, str) and p for p in ref):
            raise VideoError(MISSING_VIDEO, "a frame-list video must be a non-empty list of image paths")
        if (url := next((p for p in ref if is_url(p)), None)) is not None:
            raise VideoError(MISSING_VIDEO, f"video frame {url!r}: {NOT_FETCHED}")
        return {"frames": [absolute(p) for p in ref]}
    if not isinstance(ref, str) or not ref:
        raise VideoError(MISSING_VIDEO, "a video item needs a path or a list of frame paths")
    if is_url(ref):
        raise VideoError(MISSING_VIDEO, f"video {ref!r}: {NOT_FETCHED}")
    path = absolute(ref)
    if os.path.isdir(path):
        frames = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not frames:
            raise VideoError(MISSING_VIDEO, f"video directory has no image files ({sorted(IMAGE_EXTENSIONS)}): {path}")
        return {"frames": [os.path.join(path, n) for n in frames]}
    if not os.path.isfile(path):
        raise VideoError(MISSING_VIDEO, f"video not found: {path}")
    return {"file": path}


def _frame_header(path: str) -> tuple[int, int]:
    """(height, width) of a frame as decoded (EXIF rotation applied), from the header; verifies the file."""
    if not os.path.isfile(path):
        raise VideoError(MISSING_VIDEO, f"video frame not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()  # checks structure/CRCs without decoding; the image cannot be used afterwards
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112)
    except Exception as err:  # PIL raises many types for bad files
        raise VideoError(CORRUPT_VIDEO, f"cannot read video frame {path}: {type(err).__name__}: {err}") from None
    return (width, height) if orientation in _EXIF_SWAPS_AXES else (height, width)


def decoder_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def probe(source: dict, cfg: VideoConfig, fps: float | None = None) -> dict:
    """Plan one video without decoding pixels -> the source plus {"indices", "fps", "grid"}.

    fps: the frame rate of a frame list (the item's "fps"); None -> transformers' fallback (24) for the timestamps.
    """
    if "frames" in source:
        sizes = {_frame_header(p) for p in source["frames"]}
        if len(sizes) > 1:
            raise VideoError(CORRUPT_VIDEO, f"frames of one video differ in size: {sorted(sizes)}")
        (height, width), = sizes
        total, video_fps = len(source["frames"]), fps
        indices = list(range(total))
    else:
        if not decoder_available():
            raise VideoError(VIDEO_DECODER_MISSING, f"{source['file']}: decoding video files needs PyAV "
                             "(`pip install av`); or give the video as a list or directory of frame images")
        try:
            import av

            with av.open(source["file"]) as container:
                stream = container.streams.video[0]
                total, rate = int(stream.frames), stream.average_rate
                height, width = int(stream.height), int(stream.width)
        except Exception as err:
            detail = f"cannot open video {source['file']}: {type(err).__name__}: {err}"
            raise VideoError(CORRUPT_VIDEO, detail) from None
        if total <= 0:
            raise VideoError(CORRUPT_VIDEO, f"{source['file']}: the container reports no frames")
        video_fps = float(rate) if rate else None
        indices = cfg.sample_indices(total, video_fps)
    if len(indices) < cfg.temporal_patch_size:
        raise VideoError(VIDEO_TOO_SHORT, f"{len(indices)} frame(s); transformers' video smart_resize needs at least "
                         f"temporal_patch_size={cfg.temporal_patch_size}")
    try:
        grid = cfg.grid(len(indices), height, width)
    except ValueError as err:  # extreme aspect ratio
        raise VideoError(CORRUPT_VIDEO, str(err)) from None
    return {**source, "indices": indices, "fps": video_fps, "grid": grid}


# ---------------------------------------------------------------------------------------------- pixels
def load_frame(path: str) -> torch.Tensor:
    """(3, H, W) uint8, like transformers' load_image_as_tensor: EXIF orientation applied, RGB (alpha dropped)."""
    with Image.open(path) as im:
        im = to_8bit(ImageOps.exif_transpose(im))  # a 16-bit frame would clip to white in convert("RGB")
        rgb = im.convert("RGB") if im.mode != "RGB" else im.copy()
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode(planned: dict) -> torch.Tensor:
    """The planned video's frames as (T, 3, H, W) uint8."""
    if "frames" in planned:
        return torch.stack([load_frame(planned["frames"][i]) for i in planned["indices"]])
    import av

    wanted = set(planned["indices"])
    last = max(wanted)
    frames = []
    with av.open(planned["file"]) as container:  # transformers' read_video_pyav: decode in order, keep the indices
        for i, frame in enumerate(container.decode(video=0)):
            if i > last:
                break
            if i in wanted:
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1))
    if len(frames) != len(planned["indices"]):
        raise ValueError(f"{planned['file']}: decoded {len(frames)} of the {len(planned['indices'])} planned frames")
    return torch.stack(frames).contiguous()


def resize(video: torch.Tensor, height: int, width: int, resample: int = 3) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize on a (T, C, H, W) uint8 tensor (antialias=True), in torch."""
    if tuple(video.shape[-2:]) == (height, width):
        return video
    mode = _INTERPOLATION.get(int(resample))
    if mode is None:
        raise ValueError(f"resample={resample} is not supported for video (use 0 nearest, 2 bilinear, 3 bicubic)")
    antialias = mode in ("bilinear", "bicubic")
    native_uint8 = mode in ("nearest-exact", "bicubic") or (
        mode == "bilinear" and "AVX2" in torch.backends.cpu.get_cpu_capability())
    x = video if native_uint8 or video.dtype != torch.uint8 else video.to(torch.float32)
    kw = {"align_corners": False} if antialias else {}
    out = F.interpolate(x, size=[height, width], mode=mode, antialias=antialias, **kw)
    if out.dtype != video.dtype:  # torchvision's float path for uint8
        out = out.round_().to(video.dtype)
    return out


def rescale_and_normalize(video: torch.Tensor, cfg: VideoConfig) -> torch.Tensor:
    """TorchvisionBackend.rescale_and_normalize: the rescale is folded into mean/std when both are on."""
    if cfg.do_rescale and cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
        std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    elif cfg.do_normalize:
        mean, std = torch.tensor(cfg.image_mean), torch.tensor(cfg.image_std)
    elif cfg.do_rescale:
        return video * cfg.rescale_factor
    else:
        return video.to(torch.float32)
    x = video.to(torch.float32)
    return x.sub_(mean.to(torch.float32).view(-1, 1, 1)).div_(std.to(torch.float32).view(-1, 1, 1))


def patchify(video: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int):
    """Qwen3VLVideoProcessor.patchify on one (T, C, H, W) video -> (patches (N, C*tps*p*p), [t, h, w])."""
    num_frames, channel, height, width = video.shape
    if pad := -num_frames % temporal_patch_size:
        video = torch.cat((video, video[-1:].expand(pad, -1, -1, -1)), dim=0)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.reshape(1, grid_t, temporal_patch_size, channel, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return flat, [grid_t, grid_h, grid_w]


def preprocess(video: torch.Tensor, cfg: VideoConfig) -> tuple[torch.Tensor, list[int]]:
    """(T, 3, H, W) uint8 frames -> (pixel_values_videos rows, video_grid_thw row), as Qwen3VLVideoProcessor."""
    if video.ndim != 4 or video.shape[0] < 1:
        raise ValueError(f"expected a (T, C, H, W) video, got shape {tuple(video.shape)}")
    if video.shape[1] == 1:  # grayscale_to_rgb
        video = video.expand(-1, 3, -1, -1)
    height, width = cfg.resized_hw(video.shape[0], video.shape[-2], video.shape[-1])
    if cfg.do_resize:
        video = resize(video, height, width, cfg.resample)
    pixels = rescale_and_normalize(video, cfg)
    return patchify(pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)


def timestamps(indices: list[int], fps: float | None, temporal_patch_size: int) -> list[float]:
    """Seconds per frame group, by `Qwen3VLProcessor._calculate_timestamps` (fps None -> 24, as the processor)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    return Qwen3VLProcessor._calculate_timestamps(None, list(indices), 24 if fps is None else fps,
                                                  temporal_patch_size)


def placeholder(grid: list[int], times: list[float], merge_size: int, video_token: str, vision_start: str,
                vision_end: str) -> str:
    """The text `Qwen3VLProcessor.replace_video_token` puts in place of one `<|video_pad|>`."""
    frame_seqlen = grid[1] * grid[2] // (merge_size * merge_size)
    return "".join(f"<{times[t]:.1f} seconds>" + vision_start + video_token * frame_seqlen + vision_end
                   for t in range(grid[0]))


__all__ = ["VideoConfig", "VideoError", "decode", "decoder_available", "patchify", "placeholder",
           "preprocess", "probe", "resize", "resolve_video", "timestamps"]
