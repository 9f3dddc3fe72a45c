"""Image modes: high-bit-depth images train as their content scaled to 8 bits (never clipped to white), every other
mode as transformers' image processor converts it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.encoding import Encoder
from data_modules.images import to_8bit
from data_modules.packing import PackDataset
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


@pytest.fixture(scope="module")
def enc(emb):
    return Encoder(str(emb.model_dir), max_tokens=256)


def _gradient16(h=64, w=64) -> np.ndarray:
    """16-bit values over the whole range, low bytes that must not matter (0x00..0xff pattern)."""
    y, x = np.mgrid[0:h, 0:w]
    return ((y * w + x) * 16 + (x % 16)).astype(np.uint16)


def _png16(path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG (PIL writes 16-bit grayscale only): 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _pixels(enc, tmp_path, name) -> torch.Tensor:
    """pixel_values of a one-image document as the DataLoader worker builds them."""
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                     {"type": "text", "text": "what is this?"}]},
                        {"role": "assistant", "content": "a gradient"}]}
    rec = dict(enc.encode(row, str(tmp_path)), source="x", line=1)
    return PackDataset([rec], None, enc, pad_to_multiple_of=1)[(0,)]["pixel_values"]


def _processor(enc, image: Image.Image) -> torch.Tensor:
    return enc.processor.image_processor([image], return_tensors="pt", **enc.image_size_kwargs())["pixel_values"]


def test_16_bit_grayscale_png_trains_as_its_high_byte_not_white(enc, tmp_path):
    values = _gradient16()
    Image.fromarray(values).save(tmp_path / "g16.png")  # numpy uint16 -> PIL "I;16" -> 16-bit grayscale PNG
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        im.load()
        loaded = np.asarray(to_8bit(im))
    expected = (values >> 8).astype(np.uint8)
    assert np.array_equal(loaded, expected)
    got = _pixels(enc, tmp_path, "g16.png")
    assert torch.equal(got, _processor(enc, Image.fromarray(expected, "L")))
    with Image.open(tmp_path / "g16.png") as im:
        im.load()
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9  # PIL clips 16-bit values: nearly all white
        clipped = _processor(enc, im)  # what the loader gave before (the processor converts with PIL)
    assert not torch.equal(got, clipped)


@pytest.mark.parametrize("mode, values, expected", [
    ("I", np.array([[0, 256, 65535, 4096]], np.int32), [[0, 1, 255, 16]]),  # 16-bit range: the high byte
    ("I", np.array([[0, 7, 255, 128]], np.int32), [[0, 7, 255, 128]]),  # 8-bit range: as it is
    ("I", np.array([[-5, 0, 131070, 65535]], np.int32), [[0, 0, 255, 128]]),  # beyond 16 bits: max -> 255
    ("F", np.array([[0.0, 0.5, 1.0, 0.25]], np.float32), [[0, 128, 255, 64]]),  # [0, 1] floats -> x 255
    ("F", np.array([[0.0, 300.0, 65535.0, np.nan]], np.float32), [[0, 1, 255, 0]]),  # else as "I", NaN -> 0
])
def test_32_bit_integer_and_float_modes_scale_by_their_range(mode, values, expected):
    out = to_8bit(Image.fromarray(values, mode))
    assert out.mode == "L" and np.asarray(out).tolist() == expected


def test_16_bit_transparent_value_becomes_alpha():
    values = _gradient16(8, 8)
    im = Image.fromarray(values)
    im.info["transparency"] = int(values[0, 0])
    out = to_8bit(im)
    assert out.mode == "LA"
    alpha = np.asarray(out)[..., 1]
    assert alpha[0, 0] == 0 and (alpha == 255).sum() == alpha.size - 1


def test_16_bit_colour_pngs_are_opened_as_8_bit_high_bytes_by_pil(enc, tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0x12FF, 0xAB01, _gradient16()
    _png16(tmp_path / "rgb16.png", rgb, 2)
    la = np.stack([_gradient16(), np.full((64, 64), 0xFFFF, np.uint16)], -1)
    _png16(tmp_path / "la16.png", la, 4)
    with Image.open(tmp_path / "rgb16.png") as im:
        im.load()
        assert im.mode == "RGB" and to_8bit(im) is im  # nothing for us to do
        assert np.array_equal(np.asarray(im), (rgb >> 8).astype(np.uint8))
    with Image.open(tmp_path / "la16.png") as im:
        im.load()
        assert im.mode in ("RGBA", "LA") and to_8bit(im) is im
        assert np.array_equal(np.asarray(im)[..., 0], (la[..., 0] >> 8).astype(np.uint8))
    high = Image.fromarray((rgb >> 8).astype(np.uint8), "RGB")
    assert torch.equal(_pixels(enc, tmp_path, "rgb16.png"), _processor(enc, high))


@pytest.mark.parametrize("mode", ["LA", "P", "CMYK", "1", "L", "RGBA"])
def test_other_modes_are_left_to_the_processor(enc, tmp_path, mode):
    base = Image.fromarray(np.dstack([(_gradient16() >> 8).astype(np.uint8)] * 3), "RGB")
    if mode == "P":
        im = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 3  # palette index 3 is transparent
    elif mode in ("LA", "RGBA"):
        im = base.convert(mode)
        im.putalpha(Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8), "L"))
    else:
        im = base.convert(mode)
    im.save(tmp_path / f"m.{'tif' if mode == 'CMYK' else 'png'}")
    name = f"m.{'tif' if mode == 'CMYK' else 'png'}"
    with Image.open(tmp_path / name) as reopened:
        reopened.load()
        assert reopened.mode == mode and to_8bit(reopened) is reopened
        assert torch.equal(_pixels(enc, tmp_path, name), _processor(enc, reopened))


def test_16_bit_video_frames_are_scaled_too(tmp_path):
    from data_modules.video import load_frame

    values = _gradient16()
    Image.fromarray(values).save(tmp_path / "f16.png")
    frame = load_frame(str(tmp_path / "f16.png"))
    assert frame.shape == (3, 64, 64)
    assert torch.equal(frame[0], torch.from_numpy((values >> 8).astype(np.uint8)))  # clipped to 255 before
