"""High-bit-depth images -> 8 bits of their content, before the image processor (or the video frame loader) sees them.

transformers' image processors (5.23: `image_transforms.convert_to_rgb`, used by both backends) and PIL's own
`Image.convert("RGB")` CLIP single-channel integer and float images to 0..255 instead of scaling them: a 16-bit
grayscale PNG (PIL mode "I;16", values up to 65535) becomes an all-white image, a float TIFF in [0, 1] an
all-black one, and training sees no content at all. Here they are scaled to 8 bits first:

- "I;16" / "I;16L" / "I;16B" / "I;16N" (16-bit grayscale PNG, TIFF): the high byte, `value >> 8`. That is what PIL
  itself does for 16-bit RGB / RGBA / LA PNGs (it opens them as 8-bit "RGB" / "RGBA" holding the high byte of
  each sample), so a 16-bit gray image and a 16-bit colour image come out alike.
- "I" (32-bit integer; older Pillows open 16-bit PNGs so) : the values' range picks the scale, never the image's
  own maximum (which would brighten every dark image): all within 0..255 -> as they are; within 0..65535 -> the
  high byte (`>> 8`, as "I;16"); larger -> scaled so that the maximum is 255. Negative values clip to 0.
- "F" (32-bit float): within [0, 1] -> `round(v * 255)`; otherwise as "I" (rounded), NaN -> 0.

A 16-bit grayscale PNG's transparent value (tRNS, `info["transparency"]`) becomes an alpha channel ("LA"), so the
processor composites it on white as it does every transparent image. Every other mode (RGB, RGBA, LA, L, P with
or without transparency, CMYK, 1, ...) is left to the processor's own conversion, which is right for them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_BIT_DEPTH_MODES = SIXTEEN_BIT_MODES | {"I", "F"}


def _scaled(values: np.ndarray) -> np.ndarray:
    """Integer-valued samples (as float64) -> uint8 by their range (see the module doc)."""
    values = np.clip(np.nan_to_num(values, nan=0.0), 0, None)
    top = float(values.max()) if values.size else 0.0
    if top > 65535:
        values = values * (255.0 / top)
    elif top > 255:
        values = np.floor(values / 256.0)  # the high byte, as `>> 8` on integers
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_8bit(im: Image.Image) -> Image.Image:
    """The image with high-bit-depth samples scaled to 8 bits ("L", or "LA" when it has a transparent value);
    any other mode is returned unchanged."""
    if im.mode not in HIGH_BIT_DEPTH_MODES:
        return im
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.uint16)  # native byte order whatever the mode's
        gray = (values >> 8).astype(np.uint8)
    elif im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        finite = np.nan_to_num(values, nan=0.0)
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            gray = np.rint(finite * 255.0).astype(np.uint8)
        else:
            gray = _scaled(values)
    else:  # "I"
        values = np.asarray(im).astype(np.int64)
        gray = _scaled(values.astype(np.float64))
    out = Image.fromarray(gray, "L")
    transparent = im.info.get("transparency")
    if isinstance(transparent, (int, float)) and im.mode != "F":
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    return out
