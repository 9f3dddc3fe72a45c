"""Video rows without torchvision, checked against what transformers can run here.

transformers' Qwen3VLVideoProcessor cannot be built without torchvision, so the references are:
- pixels: the (PIL) image processor on the same frame, which a 2-frame video of identical frames must reproduce
  (temporal patch grouping repeats an image to temporal_patch_size frames); exact where no resize happens, within
  one uint8 level where torch's uint8 bicubic and PIL's round differently;
- patch layout: an index formula written from the processor's documented (t, h-block, w-block, merge) order;
- grids: transformers' own `get_num_of_video_patches`, called on a namespace holding the config;
- tokens: transformers' `Qwen3VLProcessor.__call__` run with our pixel path standing in for its video processor
  (`_TorchVideoProcessor`), so the placeholder expansion, timestamps text, tokenisation and mm_token_type_ids are
  transformers' code; plus hand-computed timestamp strings from the processor source;
- positions: transformers' `get_rope_index` (meta-device model) per document.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules import MultimodalPackingDataModule
from data_modules import video as V
from data_modules.encoding import IGNORE, BadSample, Encoder
from data_modules.packing import PackDataset
from data_modules.processor import load_processor
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def _noise_frames(dir_path, n, h, w, seed=0, prefix="f"):
    """n random RGB frames saved as PNG (lossless, so decoding is exact); returns their paths."""
    dir_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = dir_path / f"{prefix}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


class _TorchVideoProcessor:
    """Stands in for Qwen3VLVideoProcessor inside transformers' Qwen3VLProcessor: pixels from data_modules.video,
    metadata as transformers builds it for pre-sampled frames (fps None unless given, frames_indices 0..n-1)."""

    def __init__(self, cfg: V.VideoConfig, fps=None):
        self.cfg, self.fps = cfg, fps
        self.merge_size, self.temporal_patch_size = cfg.merge_size, cfg.temporal_patch_size

    def __call__(self, videos, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import VideoMetadata, make_batched_videos

        pixels, grids, metas = [], [], []
        for frames, fps in zip(make_batched_videos(videos), self.fps or [None] * 99):
            values, grid = V.preprocess(torch.stack([V.load_frame(f) for f in frames]), self.cfg)
            pixels.append(values)
            grids.append(grid)
            metas.append(VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(range(len(frames)))))
        return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metas})


def _processor_with_video(model_dir, cfg, fps=None):
    proc = copy.copy(load_processor(str(model_dir)))
    proc.video_processor = _TorchVideoProcessor(cfg, fps)
    return proc


# ------------------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("hw", [(64, 64), (32, 96), (50, 90), (37, 41), (120, 100)])
def test_two_identical_frames_equal_the_image_processor(emb, tmp_path, hw):
    """A 2-frame video of one frame is that frame as an image (the image processor repeats it to temporal_patch_size)
    when the video bounds are the image bounds times 2 frames: same grid, same patches."""
    processor = load_processor(str(emb.model_dir))
    (path,) = _noise_frames(tmp_path, 1, *hw)
    image_size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    ref = processor.image_processor([Image.open(path).convert("RGB")], return_tensors="pt", size=image_size)
    cfg = V.VideoConfig.from_model_dir(str(emb.model_dir), 2 * 32 * 32, 2 * 64 * 64)
    frame = V.load_frame(path)
    pixels, grid = V.preprocess(torch.stack([frame, frame]), cfg)
    assert grid == ref["image_grid_thw"][0].tolist()
    assert pixels.shape == ref["pixel_values"].shape
    diff = (pixels - ref["pixel_values"]).abs()
    resized = cfg.resized_hw(2, *hw) != hw
    if not resized:
        assert diff.max() < 1e-6
    else:  # torch's uint8 antialiased bicubic (torchvision's path) vs PIL's: at most one uint8 level apart
        level = 1 / 255 / 0.5
        assert diff.max() <= level + 1e-6
        assert (diff > 1e-6).float().mean() < 0.5


def test_patch_layout_matches_index_formula():
    """Row r of pixel_values_videos is patch (t, y, x) at r = t*h*w + ((y//m)*(w//m) + x//m)*m*m + (y%m)*m + x%m;
    each row is (channel, temporal, patch row, patch col); an odd frame count repeats the last frame."""
    cfg = V.VideoConfig(size={"shortest_edge": 1, "longest_edge": 10**9}, do_resize=False, do_normalize=False,
                        do_rescale=False, patch_size=4, merge_size=2, temporal_patch_size=2)
    torch.manual_seed(0)
    video = torch.randint(0, 256, (3, 3, 16, 8), dtype=torch.uint8)
    pixels, grid = V.preprocess(video, cfg)
    assert grid == [2, 4, 2]
    padded = torch.cat([video, video[-1:]]).float()
    p, m, (gt, gh, gw) = 4, 2, grid
    for t in range(gt):
        for y in range(gh):
            for x in range(gw):
                r = t * gh * gw + ((y // m) * (gw // m) + x // m) * m * m + (y % m) * m + x % m
                block = padded[2 * t : 2 * t + 2, :, y * p : (y + 1) * p, x * p : (x + 1) * p]  # (T, C, p, p)
                assert torch.equal(pixels[r], block.permute(1, 0, 2, 3).reshape(-1))


def test_normalisation_is_the_fused_rescale():
    """(x/255 - mean)/std computed as transformers fuses it: (x - mean*255) / (std*255), float32."""
    cfg = V.VideoConfig(image_mean=(0.48, 0.45, 0.40), image_std=(0.26, 0.26, 0.27))
    x = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    got = V.rescale_and_normalize(x, cfg)
    ref = (x.double() / 255 - torch.tensor(cfg.image_mean, dtype=torch.double).view(-1, 1, 1)) / torch.tensor(
        cfg.image_std, dtype=torch.double).view(-1, 1, 1)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, atol=1e-5)


@pytest.mark.parametrize("cap", [False, True])
@pytest.mark.parametrize("thw", [(2, 64, 64), (5, 50, 90), (8, 480, 640), (3, 20, 300), (16, 1080, 1920)])
def test_grid_equals_transformers_patch_count(thw, cap):
    """Our grid has the token count of transformers' Qwen3VLVideoProcessor.get_num_of_video_patches (its smart_resize,
    temporal padding and, when enabled, the per-frame pixel cap)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    cfg = V.VideoConfig(size=dict(Qwen3VLVideoProcessor.size), cap_pixels_per_frame=cap)
    owner = SimpleNamespace(**{k: getattr(cfg, k) for k in ("size", "patch_size", "merge_size", "temporal_patch_size",
                                                           "cap_pixels_per_frame", "max_video_tokens")})
    expected = Qwen3VLVideoProcessor.get_num_of_video_patches(owner, *thw)
    grid = cfg.grid(*thw)
    assert math.prod(grid) == expected and grid[0] == -(-thw[0] // 2)


def test_sampling_follows_transformers_sample_frames():
    """Encoded files are sampled like Qwen3VLVideoProcessor.sample_frames (fps-based, clamped to min/max frames)."""
    cfg = V.VideoConfig(fps=2, min_frames=4, max_frames=768, do_sample_frames=True)
    assert cfg.sample_indices(300, 30.0) == np.linspace(0, 299, 20).round().astype(int).tolist()  # 10 s at 2 fps
    assert cfg.sample_indices(10, 30.0) == [0, 3, 6, 9]  # min_frames
    assert cfg.sample_indices(3, None) == [0, 1, 2]  # never more than the video has
    assert V.VideoConfig(do_sample_frames=False).sample_indices(7, 30.0) == list(range(7))


# ------------------------------------------------------------------------------------------------ tokens
def test_timestamps_and_placeholder_hand_computed():
    """From processing_qwen3_vl: indices padded to a multiple of temporal_patch_size with the last index, seconds =
    index / fps (24 when unknown), averaged per pair, printed with one decimal."""
    assert [f"{t:.1f}" for t in V.timestamps([0, 1, 2, 3, 4], None, 2)] == ["0.0", "0.1", "0.2"]
    assert [f"{t:.1f}" for t in V.timestamps([0, 1, 2, 3, 4], 2.0, 2)] == ["0.2", "1.2", "2.0"]
    assert [f"{t:.1f}" for t in V.timestamps([0, 15, 30, 45], 30.0, 2)] == ["0.2", "1.2"]
    text = V.placeholder([2, 4, 2], [0.25, 1.25], 2, "<V>", "<s>", "<e>")
    assert text == "<0.2 seconds><s><V><V><e><1.2 seconds><s><V><V><e>"


def _video_rows(tmp_path):
    frames = _noise_frames(tmp_path / "clipA", 5, 48, 80, seed=1)
    _noise_frames(tmp_path / "clipB", 4, 64, 64, seed=2)
    (tmp_path / "clipB" / "notes.txt").write_text("not a frame")  # ignored: not an image file
    img = _noise_frames(tmp_path, 1, 64, 64, seed=3, prefix="still")[0]
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "video", "fps": 2,  # relative frame paths
                                                    "video": ["clipA/" + f.split("/")[-1] for f in frames]},
                                                   {"type": "text", "text": "What moves?"}]},
                      {"role": "assistant", "content": "the noise"}]},
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": [{"type": "image", "image": "still000.png"},
                                                   {"type": "text", "text": "and this one?"},
                                                   {"type": "video", "video": "clipB"}]},
                      {"role": "assistant", "content": "grey"}]},
        {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"}]},
    ]
    fps = [[2.0], [None], []]
    return rows, fps, img


def _reference(processor, encoder, row, base_dir, fps):
    """input_ids, mm_token_type_ids, grids, pixels and assistant labels of one document, by transformers' processor."""
    messages, images, videos = encoder.normalise_messages(row, base_dir)
    processor.video_processor.fps = fps
    text = processor.apply_chat_template(messages, tokenize=False)
    pil = [Image.open(p).convert("RGB") for p in images]
    vids = [v["frames"] for v in videos]
    out = processor(text=[text], images=pil or None, videos=[vids] if vids else None, return_tensors="pt")
    masked = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    ids = out["input_ids"][0]
    assert masked["input_ids"][0] == ids.tolist()
    mask = torch.tensor(masked["assistant_masks"][0], dtype=torch.bool)
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE))
    return out, labels


def test_video_documents_equal_transformers_processor_and_rope(emb, tmp_path):
    """Encoded ids/labels/grids and the packed row's ids, mm_token_type_ids, labels, position_ids and pixels equal
    transformers' processor + get_rope_index on each document alone."""
    from transformers import AutoConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeModel

    encoder = Encoder(str(emb.model_dir), max_tokens=512)
    processor = _processor_with_video(emb.model_dir, encoder.video_config)
    rows, fps, _ = _video_rows(tmp_path)
    base = str(tmp_path)
    records = [dict(encoder.encode(r, base), source="x", line=i + 1) for i, r in enumerate(rows)]
    assert [len(r["videos"]) for r in records] == [1, 1, 0]
    assert [json.loads(v)["frames"][-1].split("/")[-2:] for v in records[1]["videos"]] == [["clipB", "f003.png"]]
    batch = PackDataset(records, None, encoder, pad_to_multiple_of=64)[tuple(range(len(records)))]
    config = AutoConfig.from_pretrained(emb.model_dir)
    with torch.device("meta"):
        model = Qwen3_5MoeModel(config)
    cu = batch["cu_seqlens"].tolist()
    vid_at = img_at = 0
    for d, (row, rec) in enumerate(zip(rows, records)):
        ref, ref_labels = _reference(processor, encoder, row, base, fps[d])
        assert rec["input_ids"] == ref["input_ids"][0].tolist()
        assert rec["labels"] == ref_labels.tolist()
        s, e = cu[d], cu[d + 1]
        assert batch["input_ids"][0, s:e].tolist() == ref["input_ids"][0].tolist()
        assert batch["mm_token_type_ids"][0, s:e].tolist() == ref["mm_token_type_ids"][0].tolist()
        expected = ref_labels.clone()
        expected[0] = IGNORE
        assert batch["labels"][0, s:e].tolist() == expected.tolist()
        vgrid, igrid = ref.get("video_grid_thw"), ref.get("image_grid_thw")
        if vgrid is not None:
            assert rec["video_grids"] == vgrid.tolist()
            n = int(vgrid.prod(-1).sum())
            assert torch.equal(batch["pixel_values_videos"][vid_at : vid_at + n], ref["pixel_values_videos"])
            vid_at += n
        if igrid is not None:
            img_at += int(igrid.prod(-1).sum())
        pos, _ = model.get_rope_index(ref["input_ids"], torch.as_tensor(ref["mm_token_type_ids"]), igrid, vgrid)
        assert torch.equal(batch["position_ids"][:, :, s:e], pos)
    assert vid_at == batch["pixel_values_videos"].shape[0] and img_at == batch["pixel_values"].shape[0]
    assert batch["video_grid_thw"].tolist() == [g for r in records for g in r["video_grids"]]
    text = encoder.processor.tokenizer.decode(records[0]["input_ids"])
    assert "<|vision_start|><0.2 seconds><|vision_start|>" in text and "<2.0 seconds>" in text  # fps=2 timestamps


def test_truncation_never_cuts_a_video(emb, tmp_path):
    """A cut inside a video drops the whole video (from the template's vision_start on) and what follows."""
    frames = _noise_frames(tmp_path, 4, 64, 64)
    row = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"},
                        {"role": "user", "content": [{"type": "video", "video": frames}]},
                        {"role": "assistant", "content": "noise"}]}
    enc = Encoder(str(emb.model_dir), max_tokens=512)
    full = enc.encode(row, str(tmp_path))
    first_vs = full["input_ids"].index(enc.vision_start_id)
    last_video = len(full["input_ids"]) - 1 - full["input_ids"][::-1].index(enc.video_token_id)
    for cut_at in (first_vs + 3, last_video, last_video + 1):  # inside frame 1, on the last pad, on a frame's end
        enc.max_tokens = cut_at
        cut = enc.encode(row, str(tmp_path))
        assert cut["truncated"] and cut["videos"] == [] and cut["video_grids"] == []
        assert cut["input_ids"] == full["input_ids"][:first_vs]
        assert enc.processor.tokenizer.decode([t for t in cut["labels"] if t != IGNORE]) == "four<|im_end|>"


def test_video_rows_through_the_datamodule(emb, tmp_path):
    """Frame-list and frame-directory videos are kept (none skipped), planned with their visual tokens and batched
    with pixel_values_videos / video_grid_thw; an unreadable video is counted under its reason."""
    rows, _, _ = _video_rows(tmp_path)
    rows.append({"messages": [{"role": "user", "content": [{"type": "video", "video": "missing_dir"}]},
                              {"role": "assistant", "content": "x"}]})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = MultimodalPackingDataModule(model_path=str(emb.model_dir), train_path=str(train), val_path=None,
                                     num_workers=0, max_tokens=256, pad_to_multiple_of=16,
                                     cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.stats["train"] == {"ok": 3, "missing_video": 1}
    batches = list(dm.train_dataloader())
    assert sum(b["num_documents"] for b in batches) == 3
    grids = torch.cat([b["video_grid_thw"] for b in batches if b["video_grid_thw"] is not None])
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    lo, hi = dm.train_dataset.encoder.video_config.bounds
    expected = []
    for t, h, w in ((5, 48, 80), (4, 64, 64)):  # clipA, clipB
        rh, rw = smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi)
        expected.append([-(-t // 2), rh // 16, rw // 16])
    assert sorted(grids.tolist()) == sorted(expected)
    for b in batches:
        n_video_tokens = int((b["mm_token_type_ids"] == 2).sum())
        if b["video_grid_thw"] is None:
            assert n_video_tokens == 0 and b["pixel_values_videos"] is None
        else:
            assert n_video_tokens == int(b["video_grid_thw"].prod(-1).sum()) // 4
            assert b["pixel_values_videos"].shape == (int(b["video_grid_thw"].prod(-1).sum()), 3 * 2 * 16 * 16)


def test_bad_fps_and_frames_of_different_sizes(emb, tmp_path):
    """A non-positive fps is a schema error; frames of one video must share a size (transformers stacks them)."""
    a = _noise_frames(tmp_path / "a", 1, 64, 64)[0]
    b = _noise_frames(tmp_path / "b", 1, 32, 64)[0]
    enc = Encoder(str(emb.model_dir), max_tokens=512)

    def row(item):
        return {"messages": [{"role": "user", "content": [item]}, {"role": "assistant", "content": "x"}]}

    with pytest.raises(BadSample, match="bad_schema: .*fps"):
        enc.encode(row({"type": "video", "video": [a, a], "fps": 0}), str(tmp_path))
    with pytest.raises(BadSample, match="corrupt_video: frames of one video differ in size"):
        enc.encode(row({"type": "video", "video": [a, b]}), str(tmp_path))
    with pytest.raises(BadSample, match="missing_video: .*non-empty list"):
        enc.encode(row({"type": "video", "video": []}), str(tmp_path))


def test_encoded_video_file_with_pyav(emb, tmp_path):
    """Where PyAV is installed, an mp4 is decoded and sampled like transformers' read_video_pyav + sample_frames."""
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(30):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    cfg = V.VideoConfig.from_model_dir(str(emb.model_dir))
    planned = V.probe({"file": str(path)}, cfg)
    assert planned["fps"] == 10.0
    assert planned["indices"] == list(range(30))  # the embedded config has do_sample_frames=False: every frame
    sampled = V.probe({"file": str(path)}, V.VideoConfig(**{**cfg.__dict__, "do_sample_frames": True}))
    assert sampled["indices"] == np.linspace(0, 29, 6).round().astype(int).tolist()  # 3 s at 2 fps
    frames = V.decode(sampled)
    assert frames.shape == (6, 3, 48, 64) and frames.dtype == torch.uint8
    with av.open(str(path)) as container:
        all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for k, i in enumerate(sampled["indices"]):
        assert np.array_equal(frames[k].permute(1, 2, 0).numpy(), all_frames[i])
    values, grid = V.preprocess(frames, cfg)
    assert grid == sampled["grid"] and values.shape[0] == math.prod(grid)
