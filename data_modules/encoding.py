"""Row validation and tokenisation: one raw row -> token ids, labels and image references (no pixel decoding).

The ids are what `processor(text=apply_chat_template(messages), images=..., videos=...)` produces, computed without
decoding pixels: the chat template is rendered, each `<|image_pad|>` is expanded to the number of merged patches the
image processor will produce for that image size (`smart_resize` on the size read from the file header), each
`<|video_pad|>` to what `Qwen3VLProcessor.replace_video_token` writes for that video (per frame group
`<{t:.1f} seconds><|vision_start|>` + merged patches of one frame + `<|vision_end|>`, inside the template's own
vision_start/end; grid and timestamps from `video.probe`, headers only), and the text is tokenised once. Pixels are
decoded later, in DataLoader workers (`packing.PackDataset`; videos through `video.preprocess`, no torchvision).

Labels (HF convention, unshifted):
- "assistant": tokens inside assistant turns, found as character spans `<|im_start|>assistant\\n ... <|im_end|>`
  (the end marker included so the model learns to stop) mapped to tokens through the offset mapping. Working on
  characters, not token patterns, keeps this independent of how the BPE splits the text around the headers.
- "all": every token except vision placeholders (which carry no predictable content).
- `{"text": ...}` rows: all tokens, with `<|endoftext|>` appended as the document end.

Image and video paths resolve relative to the data file's directory and may be absolute (or climb out with
`../`); `http://` / `https://` references are refused with a clear reason (`missing_image` / `missing_video`):
nothing is downloaded. `media_paths` lists the files a row references, for the preparation cache's key.

Bad rows raise `BadSample(reason, detail)`; the caller counts them (or, strict, fails with file:line).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from PIL import Image

from . import video as video_lib
from .video import (CORRUPT_VIDEO, MISSING_VIDEO, NOT_FETCHED, VIDEO_DECODER_MISSING, VIDEO_TOO_SHORT, VideoError,
                    is_url)

IGNORE = -100

# Skip reasons (stable names: they appear in logs and in DataModule.stats).
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8 (never decoded with replacement characters)
BAD_SCHEMA = "bad_schema"
MISSING_ROLE = "missing_role"
BAD_ROLE = "bad_role"  # a role the chat template does not know and no common alias of one
MISSING_CONTENT = "missing_content"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
# Decode time only (a document dropped from its pack in a DataLoader worker, counted; see packing.PackDataset): the
# image (video) now gives another size than the one planned at preparation, i.e. it was replaced during the run.
IMAGE_CHANGED = "image_changed"
VIDEO_CHANGED = "video_changed"
TOO_LONG = "too_long"
NO_TARGETS = "no_targets"
IMAGE_FOR_TEXT_MODEL = "image_for_text_model"  # an image / video row, and a text-only model's processor
EMPTY_FILE = "empty_file"
# Video reasons (defined in video.py): MISSING_VIDEO "missing_video" (path, frame or frame directory not found, empty
# frame list), CORRUPT_VIDEO "corrupt_video" (unreadable frame or container, frames of different sizes),
# VIDEO_TOO_SHORT "video_too_short" (fewer frames than temporal_patch_size: transformers' smart_resize raises),
# VIDEO_DECODER_MISSING "video_decoder_missing" (an encoded video file and no PyAV to decode it).
VIDEO_REASONS = (MISSING_VIDEO, CORRUPT_VIDEO, VIDEO_TOO_SHORT, VIDEO_DECODER_MISSING)
ROLES = {"system", "user", "assistant", "tool"}  # what the Qwen chat templates render
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT's names
# The Qwen chat templates open an assistant turn with this; its content (through `<|im_end|>`) is the target.
ASSISTANT_HEADER = "<|im_start|>assistant\n"
# Not a skip: counted so truncation is never silent either.
TRUNCATED = "truncated"


def media_paths(row, base_dir: str) -> list[str]:
    """The local files and directories a row's images and videos reference, resolved as `Encoder` resolves them, with
    the image files of a frame directory; never raises (a malformed row references what can be found). Used to key
    the preparation cache on the media: a row's verdict is re-computed when one of these changes."""
    if not isinstance(row, dict):
        return []
    messages = row.get("messages")
    if messages is None and isinstance(row.get("conversations"), list):
        messages = [{"content": t.get("value")} for t in row["conversations"] if isinstance(t, dict)]
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return []
    out: list[str] = []

    def add(ref) -> None:
        if isinstance(ref, str) and ref and not is_url(ref):
            path = ref if os.path.isabs(ref) else os.path.join(base_dir, ref)
            out.append(path)
            if os.path.isdir(path):  # a frame directory: a frame added or removed changes its mtime, not the files'
                out.extend(os.path.join(path, n) for n in sorted(os.listdir(path))
                           if os.path.splitext(n)[1].lower() in video_lib.IMAGE_EXTENSIONS)

    for msg in messages if isinstance(messages, list) else ():
        content = msg.get("content") if isinstance(msg, dict) else None
        for item in content if isinstance(content, list) else ():
            if not isinstance(item, dict):
                continue
            for key in ("image", "video", "path"):
                ref = item.get(key)
                for r in ref if isinstance(ref, list) else (ref,):
                    add(r)
    return list(dict.fromkeys(out))


class BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Same as transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize (copied: it is the contract
    between planning and the processor; test_data_encoding checks the two agree)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ProcessorFacts:
    """The processor's tokens, ids and sizes that encoding needs (placeholders, document end, patch geometry). A
    text-only model's processor has no vision: its vision tokens and ids are None."""

    image_token: str | None
    image_token_id: int | None
    video_token: str | None
    video_token_id: int | None
    vision_start: str | None
    vision_start_id: int | None
    vision_end: str | None
    vision_end_id: int | None
    eos_id: int  # the document end appended to plain-text rows
    patch: int  # vision patch size (pixels; 0 without vision)
    merge: int  # spatial merge size (patches)
    pixel_bounds: tuple[int, int]  # image pixel bounds the plan and the image processor use
    video_config: video_lib.VideoConfig | None

    @property
    def has_vision(self) -> bool:
        return self.image_token is not None

    @classmethod
    def of(cls, processor, encoder: Encoder) -> ProcessorFacts:
        tok, ip = processor.tokenizer, processor.image_processor
        if ip is None:  # a text-only model
            return cls(None, None, None, None, None, None, None, None, _eos_id(tok), 0, 1, (0, 0), None)
        image_token = processor.image_token
        video_token = getattr(processor, "video_token", "<|video_pad|>")
        vision_start = getattr(processor, "vision_start_token", "<|vision_start|>")
        vision_end = getattr(processor, "vision_end_token", "<|vision_end|>")
        eos_id = _eos_id(tok)
        size = ip.size
        return cls(
            image_token, tok.convert_tokens_to_ids(image_token), video_token, tok.convert_tokens_to_ids(video_token),
            vision_start, tok.convert_tokens_to_ids(vision_start), vision_end, tok.convert_tokens_to_ids(vision_end),
            eos_id, int(ip.patch_size), int(ip.merge_size),
            (int(encoder.min_pixels if encoder.min_pixels is not None else size["shortest_edge"]),
             int(encoder.max_pixels if encoder.max_pixels is not None else size["longest_edge"])),
            video_lib.VideoConfig.from_model_dir(encoder.model_dir, encoder.video_min_pixels,
                                                 encoder.video_max_pixels))


def _eos_id(tokenizer) -> int:
    """The document end appended to plain-text rows: `<|endoftext|>` where the tokenizer has it, else its eos."""
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return tokenizer.eos_token_id if eos_id is None or eos_id == tokenizer.unk_token_id else eos_id


class Encoder:
    """Turns raw rows into token records for one processor and one set of options (picklable for datasets.map)."""

    def __init__(self, model_dir: str, max_tokens: int, labels: str = "assistant", too_long: str = "truncate",
                 min_pixels: int | None = None, max_pixels: int | None = None, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None, video_fps: float | None = None):
        """video_min_pixels / video_max_pixels: bounds over the whole clip (frames x height x width, as the video
        processor's size), default the video processor's; video_fps: frame rate of frame-list videos that carry no
        "fps" key (None: transformers' fallback of 24 for the timestamps)."""
        if labels not in ("assistant", "all"):
            raise ValueError(f"labels must be 'assistant' or 'all', got {labels!r}")
        if too_long not in ("truncate", "drop"):
            raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
        self.model_dir, self.max_tokens, self.labels, self.too_long = str(model_dir), max_tokens, labels, too_long
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.video_min_pixels, self.video_max_pixels, self.video_fps = video_min_pixels, video_max_pixels, video_fps
        self._processor = None
        self._facts: ProcessorFacts | None = None

    # The processor is loaded lazily so the Encoder pickles small into datasets.map workers.
    def __getstate__(self):
        return {**self.__dict__, "_processor": None, "_facts": None}

    @property
    def processor(self):
        if self._processor is None:
            from .processor import load_processor

            self._processor = load_processor(self.model_dir)
        return self._processor

    @property
    def facts(self) -> ProcessorFacts:
        """What encoding reads from the processor, read once."""
        if self._facts is None:
            self._facts = ProcessorFacts.of(self.processor, self)
        return self._facts

    image_token = property(lambda self: self.facts.image_token)
    image_token_id = property(lambda self: self.facts.image_token_id)
    video_token = property(lambda self: self.facts.video_token)
    video_token_id = property(lambda self: self.facts.video_token_id)
    vision_start = property(lambda self: self.facts.vision_start)
    vision_start_id = property(lambda self: self.facts.vision_start_id)
    vision_end = property(lambda self: self.facts.vision_end)
    vision_end_id = property(lambda self: self.facts.vision_end_id)
    eos_id = property(lambda self: self.facts.eos_id)
    patch = property(lambda self: self.facts.patch)
    merge = property(lambda self: self.facts.merge)
    pixel_bounds = property(lambda self: self.facts.pixel_bounds)
    video_config = property(lambda self: self.facts.video_config)
    has_vision = property(lambda self: self.facts.has_vision)

    def _check_vision(self, images: list, videos: list) -> None:
        if (images or videos) and not self.has_vision:
            raise BadSample(IMAGE_FOR_TEXT_MODEL, f"the row holds {len(images)} image(s) / {len(videos)} video(s), but "
                            f"{self.model_dir} is a text-only model (no image processor): give it text rows, or "
                            "train a vision-language model")

    def image_size_kwargs(self) -> dict:
        """Kwargs for the image processor at load time; the same bounds the plan used."""
        return {"size": {"shortest_edge": self.pixel_bounds[0], "longest_edge": self.pixel_bounds[1]}}

    def image_grid(self, path: str) -> list[int]:
        """(t, h, w) in patches, from the file header; also decodes the file once so corrupt or truncated images fail
        here, at preparation (counted, or strict's error), not in a DataLoader worker mid-training."""
        if not os.path.isfile(path):
            raise BadSample(MISSING_IMAGE, f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                width, height = im.size
                im.verify()  # checks structure/CRCs without decoding the pixels
            with Image.open(path) as im:
                im.load()  # and decodes them: a truncated JPEG passes verify() and would only fail in training
        except Exception as err:  # PIL raises many types for bad files
            raise BadSample(CORRUPT_IMAGE, f"cannot read image {path}: {type(err).__name__}: {err}") from None
        try:
            h, w = smart_resize(height, width, self.patch * self.merge, *self.pixel_bounds)
        except ValueError as err:
            raise BadSample(CORRUPT_IMAGE, f"{path}: {err}") from None
        return [1, h // self.patch, w // self.patch]

    # ------------------------------------------------------------------ rows
    def normalise_messages(self, row: dict, base_dir: str) -> tuple[list[dict], list[str], list[dict]]:
        """-> (messages for the chat template, image paths, videos). A video is `video.resolve_video`'s source plus
        the "fps" of its item (frame lists only; None when absent), in order of appearance."""
        messages = row.get("messages")
        if messages is None and "conversations" in row:  # ShareGPT: {"conversations": [{"from", "value"}]}
            turns = row["conversations"]
            if not isinstance(turns, list):
                raise BadSample(BAD_SCHEMA, "'conversations' must be a list of {'from', 'value'} objects")
            messages = [{"role": t.get("from"), "content": t.get("value")} if isinstance(t, dict) else t
                        for t in turns]
        if isinstance(messages, str):  # parquet/JSON producers sometimes store the list as a JSON string
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise BadSample(BAD_SCHEMA, "'messages' is a string that is not JSON") from None
        if not isinstance(messages, list) or not messages:
            raise BadSample(BAD_SCHEMA, "'messages' must be a non-empty list")
        out, images, videos = [], [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise BadSample(BAD_SCHEMA, f"message {i} is not an object")
            role = msg.get("role")
            if role is None or role == "":
                raise BadSample(MISSING_ROLE, f"message {i} has no role")
            if not isinstance(role, str):
                raise BadSample(BAD_ROLE, f"message {i} has role {role!r} ({type(role).__name__}); a role is a string, "
                                f"one of {sorted(ROLES)} (or the ShareGPT names {sorted(ROLE_ALIASES)})")
            role = ROLE_ALIASES.get(role, role)
            if role not in ROLES:
                raise BadSample(BAD_ROLE, f"message {i} has role {msg['role']!r}; expected one of "
                                f"{sorted(ROLES)} (or the ShareGPT names {sorted(ROLE_ALIASES)})")
            content = msg.get("content")
            if content is None or content == "" or content == []:
                raise BadSample(MISSING_CONTENT, f"message {i} ({role}) has no content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            if not isinstance(content, list):
                raise BadSample(BAD_SCHEMA, f"message {i} content must be a string or a list")
            items = []
            for item in content:
                if not isinstance(item, dict):
                    raise BadSample(BAD_SCHEMA, f"message {i} has a content item that is not an object")
                kind = item.get("type") or ("image" if "image" in item else "video" if "video" in item else "text")
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise BadSample(MISSING_CONTENT, f"message {i} has a text item without text")
                    items.append({"type": "text", "text": item["text"]})
                elif kind == "image":
                    ref = item.get("image", item.get("path"))
                    if not isinstance(ref, str) or not ref:
                        raise BadSample(MISSING_IMAGE, f"message {i} has an image item without a path")
                    if role == "assistant":
                        raise BadSample(BAD_SCHEMA, f"message {i}: images in assistant turns are not supported")
                    if is_url(ref):
                        raise BadSample(MISSING_IMAGE, f"message {i}: image {ref!r}: {NOT_FETCHED}")
                    path = ref if os.path.isabs(ref) else os.path.join(base_dir, ref)
                    images.append(path)
                    items.append({"type": "image", "image": path})
                elif kind == "video":
                    ref = item.get("video", item.get("path"))
                    if role == "assistant":
                        raise BadSample(BAD_SCHEMA, f"message {i}: videos in assistant turns are not supported")
                    fps = item.get("fps", self.video_fps)
                    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
                        raise BadSample(BAD_SCHEMA, f"message {i}: video 'fps' must be a positive number, got {fps!r}")
                    try:
                        source = video_lib.resolve_video(ref, base_dir)
                    except VideoError as err:
                        raise BadSample(err.reason, f"message {i}: {err.detail}") from None
                    videos.append({**source, "fps": None if fps is None else float(fps)})
                    items.append({"type": "video", "video": source.get("frames", source.get("file"))})
                else:
                    raise BadSample(BAD_SCHEMA, f"message {i} has a content item of unknown type {kind!r}")
            if not items:
                raise BadSample(MISSING_CONTENT, f"message {i} ({role}) has no content")
            out.append({"role": role, "content": items})
        return out, images, videos

    def probe_video(self, video: dict) -> dict:
        """Plan one normalised video (grid, frame indices, fps) from headers; bad videos raise BadSample."""
        source = {k: v for k, v in video.items() if k != "fps"}
        try:
            return video_lib.probe(source, self.video_config, video.get("fps"))
        except VideoError as err:
            raise BadSample(err.reason, err.detail) from None

    def video_placeholder(self, planned: dict) -> str:
        """What transformers' Qwen3VLProcessor.replace_video_token writes for this planned video."""
        cfg = self.video_config
        times = video_lib.timestamps(planned["indices"], planned["fps"], cfg.temporal_patch_size)
        return video_lib.placeholder(planned["grid"], times, cfg.merge_size, self.video_token, self.vision_start,
                                     self.vision_end)

    def encode(self, row: dict, base_dir: str) -> dict:
        """Raw row -> {input_ids, labels, images, image_grids, videos, video_grids, num_tokens, num_visual_tokens,
        truncated}. `videos` holds each planned video as JSON (source, frame indices, fps, grid)."""
        p = self.processor
        if not isinstance(row, dict):
            raise BadSample(BAD_SCHEMA, "row is not a JSON object")
        if "messages" not in row and "conversations" not in row:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise BadSample(MISSING_CONTENT, "row has neither 'messages' nor a non-empty 'text'")
            ids = p.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
            return self._finish(list(ids), list(ids), [], [])
        messages, images, videos = self.normalise_messages(row, base_dir)
        self._check_vision(images, videos)
        grids = [self.image_grid(path) for path in images]
        planned = [self.probe_video(v) for v in videos]
        expanded, ids, offsets, spans = self._render(messages, grids, planned)
        if self.labels == "all":
            labels = [IGNORE if t in (self.image_token_id, self.video_token_id) else t for t in ids]
        else:
            labels = self._assistant_labels(expanded, ids, offsets)
        return self._finish(ids, labels, images, grids, [json.dumps(v) for v in planned],
                            [v["grid"] for v in planned], spans)

    @staticmethod
    def _assistant_labels(expanded: str, ids: list[int], offsets) -> list[int]:
        """Labels of the tokens inside assistant turns (`<|im_start|>assistant\\n` ... `<|im_end|>` included)."""
        turns = [(m.start(1), m.end(1)) for m in re.finditer(
            re.escape(ASSISTANT_HEADER) + r"(.*?<\|im_end\|>)", expanded, flags=re.DOTALL)]
        labels = [IGNORE] * len(ids)
        k = 0
        for t, (s, e) in enumerate(offsets):
            while k < len(turns) and turns[k][1] <= s:
                k += 1
            if k < len(turns) and s >= turns[k][0] and e <= turns[k][1] and e > s:
                labels[t] = ids[t]
        return labels

    def _render(self, messages: list[dict], grids: list[list[int]], planned: list[dict],
                add_generation_prompt: bool = False) -> tuple[str, list[int], list, list[tuple[str, int, int]]]:
        """Chat template with the vision placeholders expanded -> (text, ids, offsets, vision token spans)."""
        p = self.processor
        text = p.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # a text-only model's processor has no placeholders to expand (rows with images were refused before)
        expanded, char_spans = self._expand_placeholders(text, grids, planned) if self.has_vision else (text, [])
        enc = p.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return expanded, ids, enc["offset_mapping"], self._token_spans(ids, enc["offset_mapping"], char_spans)

    def _expand_placeholders(self, text: str, grids: list[list[int]], planned: list[dict]) -> tuple[str, list]:
        """Each image / video placeholder of the rendered template -> its tokens; (text, character spans of them)."""
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text)
        n_img, n_vid = pieces[1::2].count(self.image_token), pieces[1::2].count(self.video_token)
        if (n_img, n_vid) != (len(grids), len(planned)):
            raise BadSample(BAD_SCHEMA, f"the chat template emitted {n_img} image / {n_vid} video placeholders for "
                            f"{len(grids)} images / {len(planned)} videos")
        merge2 = self.merge * self.merge
        expanded, char_spans = pieces[0], []
        next_grid, next_video = iter(grids), iter(planned)
        for token, piece in zip(pieces[1::2], pieces[2::2]):
            if token == self.image_token:
                grid = next(next_grid)
                replacement, kind = self.image_token * (grid[0] * grid[1] * grid[2] // merge2), "image"
            else:
                replacement, kind = self.video_placeholder(next(next_video)), "video"
            char_spans.append((kind, len(expanded), len(expanded) + len(replacement)))
            expanded += replacement + piece
        return expanded, char_spans

    def encode_prompt(self, row: dict, base_dir: str) -> dict:
        """Raw row -> the prompt of `cli.py predict`: {input_ids, labels (all ignored), images, image_grids, videos,
        video_grids, num_tokens, num_visual_tokens, truncated, reference, reference_ids, prompt_id}.

        A final assistant turn is the reference answer, and the prompt is the row's own training encoding up to that
        turn's first target token: generation then starts exactly where validation's teacher forcing judges the
        answer. `reference_ids` are that turn's target tokens (answer and end token), what greedy generation must
        reproduce to count as right, as in validation. Without a final assistant turn the prompt is the chat
        template's generation prompt and there is no reference. A prompt longer than max_tokens is skipped
        (too_long): a cut prompt would ask another question."""
        if not isinstance(row, dict):
            raise BadSample(BAD_SCHEMA, "row is not a JSON object")
        if "messages" not in row and "conversations" not in row:
            raise BadSample(BAD_SCHEMA, "a prompt row needs 'messages' (or ShareGPT 'conversations'); a plain 'text' "
                            "row has no question to answer")
        messages, images, videos = self.normalise_messages(row, base_dir)
        self._check_vision(images, videos)
        grids = [self.image_grid(path) for path in images]
        planned = [self.probe_video(v) for v in videos]
        reference, reference_ids = None, None
        if messages[-1]["role"] == "assistant":
            content = messages[-1]["content"]
            reference = content if isinstance(content, str) else "".join(i["text"] for i in content
                                                                           if i["type"] == "text")
            if len(messages) == 1:
                raise BadSample(BAD_SCHEMA, "the row holds only an assistant turn: there is no prompt")
            expanded, ids, offsets, _ = self._render(messages, grids, planned)
            header = expanded.rfind(ASSISTANT_HEADER)
            if header < 0:
                raise BadSample(BAD_SCHEMA, "the chat template rendered no '<|im_start|>assistant' header for the "
                                "final assistant turn")
            start = header + len(ASSISTANT_HEADER)
            cut = next((t for t, (s, _e) in enumerate(offsets) if s >= start), len(ids))
            reference_ids = [t for t in self._assistant_labels(expanded, ids, offsets)[cut:] if t != IGNORE]
            ids = ids[:cut]
        else:
            expanded, ids, offsets, _ = self._render(messages, grids, planned, add_generation_prompt=True)
        if len(ids) > self.max_tokens:
            raise BadSample(TOO_LONG, f"prompt of {len(ids)} tokens > max_tokens={self.max_tokens}")
        prompt_id = row.get("id")
        visual = sum(1 for t in ids if t in (self.image_token_id, self.video_token_id))
        return {"input_ids": ids, "labels": [IGNORE] * len(ids), "images": images, "image_grids": grids,
                "videos": [json.dumps(v) for v in planned], "video_grids": [v["grid"] for v in planned],
                "num_tokens": len(ids), "num_visual_tokens": visual, "truncated": False, "reference": reference,
                "reference_ids": reference_ids, "prompt_id": None if prompt_id is None else str(prompt_id)}

    def _token_spans(self, ids, offsets, char_spans) -> list[tuple[str, int, int]]:
        """Token ranges of each vision item, widened to the template's vision_start/end around it."""
        starts = [s for s, _ in offsets]
        out = []
        for kind, c0, c1 in char_spans:
            s = next(t for t, o in enumerate(starts) if o >= c0)
            e = next((t for t in range(s, len(ids)) if starts[t] >= c1), len(ids))
            if s > 0 and ids[s - 1] == self.vision_start_id:
                s -= 1
            if e < len(ids) and ids[e] == self.vision_end_id:
                e += 1
            out.append((kind, s, e))
        return out

    def _finish(self, ids: list[int], labels: list[int], images: list[str], grids: list[list[int]],
                videos: list[str] = (), video_grids: list[list[int]] = (), spans=()) -> dict:
        videos, video_grids = list(videos), list(video_grids)
        truncated = False
        if len(ids) > self.max_tokens:
            if self.too_long == "drop":
                raise BadSample(TOO_LONG, f"{len(ids)} tokens > max_tokens={self.max_tokens}")
            cut = self._cut(spans)
            kept_images = sum(1 for kind, _, e in spans if kind == "image" and e <= cut)
            kept_videos = sum(1 for kind, _, e in spans if kind == "video" and e <= cut)
            ids, labels = ids[:cut], labels[:cut]
            images, grids = images[:kept_images], grids[:kept_images]
            videos, video_grids = videos[:kept_videos], video_grids[:kept_videos]
            truncated = True
        if all(lab == IGNORE for lab in labels[1:]):
            raise BadSample(NO_TARGETS, "no target tokens (no assistant turn, or all cut by truncation)")
        visual = sum(1 for t in ids if t in (self.image_token_id, self.video_token_id))
        return {"input_ids": ids, "labels": labels, "images": images, "image_grids": grids, "videos": videos,
                "video_grids": video_grids, "num_tokens": len(ids), "num_visual_tokens": visual,
                "truncated": truncated}

    def _cut(self, spans) -> int:
        """Cut at max_tokens, never inside an image or a video: an item that would be cut is removed whole (from its
        opening <|vision_start|> on), together with everything after it."""
        cut = self.max_tokens
        for _kind, s, e in spans:
            if s < cut < e:
                return s
        return cut
