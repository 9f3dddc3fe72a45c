"""Reading conversation files into a cached, memory-mapped `datasets.Dataset` of encoded samples.

Two cached stages (Arrow files under the datasets cache dir, reused while inputs and options are unchanged):
1. raw rows: every file of the spec (JSONL, JSON, Parquet, or a `save_to_disk` directory) becomes rows
   {row (JSON text), source, line, base_dir, skip_reason, skip_detail}. JSONL is parsed line by line here, not by
   the datasets JSON builder, because that builder aborts the whole file on one bad line and loses line numbers.
   The cache key includes every file's size and mtime, so edited files are re-read.
2. encoded rows: `Encoder.encode` through `Dataset.map` (optionally num_proc workers), with an explicit fingerprint
   made of the stage-1 fingerprint, the processor files' contents and the encoding options.

Bad rows are kept in the cache with their `skip_reason` (so a cached run reports the same counts and strict mode
still fails on them) and filtered out with `select`, which keeps the data memory-mapped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import datasets

from .encoding import EMPTY_FILE, INVALID_JSON, INVALID_UTF8, BadSample, Encoder
from .video import decoder_available as video_decoder_available

READER_VERSION = 2  # 2: invalid UTF-8 counted per row
ENCODER_VERSION = 4  # 2: video columns; 3: roles checked, images decoded at preparation; 4: prompt reference ids


def expand_paths(spec) -> list[str]:
    """A path, glob, directory or list of those -> sorted, de-duplicated file/dataset-dir paths."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"no file matches {item!r}")
        for m in matches:
            if os.path.isdir(m) and not _is_saved_dataset(m):
                raise ValueError(f"{m} is a directory but not a datasets.save_to_disk directory; pass files or a glob")
            if not os.path.exists(m):
                raise FileNotFoundError(f"data file not found: {m}")
            if os.path.abspath(m) not in out:
                out.append(os.path.abspath(m))
    return out


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _file_stamp(path: str) -> list:
    if os.path.isdir(path):
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).rglob("*")) if p.is_file()]
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _row(row, source: str, line: int, base_dir: str, reason: str = "", detail: str = "") -> dict:
    text = "" if reason else json.dumps(row, default=str)
    return {"row": text, "source": source, "line": line, "base_dir": base_dir, "skip_reason": reason,
            "skip_detail": detail}


def _rows_of_file(path: str):
    # Relative image paths resolve against the data file's directory; for a save_to_disk directory, against the
    # directory that contains it (the dataset directory itself only holds Arrow files).
    base = os.path.dirname(os.path.normpath(path))
    count = 0
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict; point at one split's directory")
        for i, row in enumerate(ds):
            count += 1
            yield _row(row, path, i + 1, base)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        line = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                line += 1
                count += 1
                yield _row(row, path, line, base)
    elif path.endswith(".json"):
        # decoded with surrogateescape: a bad byte makes only the rows that hold it bad (found after parsing)
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            count += 1
            yield _row(None, path, err.lineno, base, INVALID_JSON, str(err))
            return
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):  # "line" of a JSON array is the element number (1-based)
            count += 1
            bad = _undecodable(row)
            if bad is not None:
                yield _row(None, path, i + 1, base, INVALID_UTF8, f"bytes that are not UTF-8 in {bad[:60]!r}")
            else:
                yield _row(row, path, i + 1, base)
    else:  # JSONL (any other extension is read as JSON lines too)
        with open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                count += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield _row(None, path, i, base, INVALID_UTF8,
                               f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8")
                    continue
                try:
                    yield _row(json.loads(text), path, i, base)
                except json.JSONDecodeError as err:
                    yield _row(None, path, i, base, INVALID_JSON, f"{err.msg} at column {err.colno}")
    if count == 0:
        yield _row(None, path, 0, base, EMPTY_FILE, "the file holds no rows")


def _undecodable(value) -> str | None:
    """The first string inside `value` holding an undecodable byte (a surrogateescape character), else None."""
    if isinstance(value, str):
        return value if any("\udc80" <= c <= "\udcff" for c in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        for part in ((key,) if isinstance(key, str) else ()) + (item,):
            bad = _undecodable(part)
            if bad is not None:
                return bad
    return None


def _generate_rows(files: list[str], stamps: list):  # stamps: only for the datasets cache key
    for path in files:
        yield from _rows_of_file(path)


RAW_FEATURES = datasets.Features({
    "row": datasets.Value("string"), "source": datasets.Value("string"), "line": datasets.Value("int64"),
    "base_dir": datasets.Value("string"), "skip_reason": datasets.Value("string"),
    "skip_detail": datasets.Value("string"),
})
ENCODED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "images": datasets.List(datasets.Value("string")),
    "image_grids": datasets.List(datasets.List(datasets.Value("int32"))),
    "videos": datasets.List(datasets.Value("string")),  # planned videos as JSON (see Encoder.encode)
    "video_grids": datasets.List(datasets.List(datasets.Value("int32"))),
    "num_tokens": datasets.Value("int32"),
    "num_visual_tokens": datasets.Value("int32"),
    "truncated": datasets.Value("bool"),
    "source": datasets.Value("string"),
    "line": datasets.Value("int64"),
    "skip_reason": datasets.Value("string"),
    "skip_detail": datasets.Value("string"),
})
# prompts of `cli.py predict` (Encoder.encode_prompt): the reference answer (None without one) and the row's "id"
PROMPT_FEATURES = datasets.Features({**ENCODED_FEATURES, "reference": datasets.Value("string"),
                                     "reference_ids": datasets.List(datasets.Value("int32")),
                                     "prompt_id": datasets.Value("string")})
_EMPTY = {"input_ids": [], "labels": [], "images": [], "image_grids": [], "videos": [], "video_grids": [],
          "num_tokens": 0, "num_visual_tokens": 0, "truncated": False}


def _encode_example(example: dict, encoder: Encoder, prompts: bool = False) -> dict:
    out = {"source": example["source"], "line": example["line"], "skip_reason": example["skip_reason"],
           "skip_detail": example["skip_detail"]}
    empty = {**_EMPTY, "reference": None, "reference_ids": None, "prompt_id": None} if prompts else _EMPTY
    if example["skip_reason"]:
        return {**empty, **out}
    encode = encoder.encode_prompt if prompts else encoder.encode
    try:
        return {**encode(json.loads(example["row"]), example["base_dir"]), **out}
    except BadSample as bad:
        return {**empty, **out, "skip_reason": bad.reason, "skip_detail": bad.detail}


def _processor_digest(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".json", ".jinja", ".txt", ".model")) and not name.startswith("model.safetensors"):
            h.update(name.encode())
            h.update(Path(model_dir, name).read_bytes())
    return h.hexdigest()[:16]


def encode_files(spec, encoder: Encoder, cache_dir: str | None = None, num_proc: int | None = None,
                 prompts: bool = False):
    """-> (encoded dataset incl. bad rows, list of files). Cached; see the module docstring. prompts: encode the
    rows as `cli.py predict` prompts (`Encoder.encode_prompt`) instead of training documents."""
    files = expand_paths(spec)
    stamps = [_file_stamp(f) for f in files]
    key = json.dumps([READER_VERSION, files, stamps], default=str)
    raw = datasets.Dataset.from_generator(
        _generate_rows, features=RAW_FEATURES, cache_dir=cache_dir, gen_kwargs={"files": files, "stamps": stamps},
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
    options = [ENCODER_VERSION, raw._fingerprint, _processor_digest(encoder.model_dir), encoder.max_tokens,
               encoder.labels, encoder.too_long, encoder.min_pixels, encoder.max_pixels, encoder.video_min_pixels,
               encoder.video_max_pixels, encoder.video_fps, video_decoder_available(), prompts]
    fp = hashlib.sha256(json.dumps(options).encode()).hexdigest()[:16]
    encoded = raw.map(_encode_example, fn_kwargs={"encoder": encoder, "prompts": prompts},
                      remove_columns=raw.column_names, features=PROMPT_FEATURES if prompts else ENCODED_FEATURES,
                      new_fingerprint=fp, num_proc=num_proc if num_proc and num_proc > 1
                      else None, desc="encoding samples")
    return encoded, files


def skip_summary(encoded) -> tuple[Counter, list[int], int]:
    """-> (skip counts per reason, indices of good rows, number of truncated good rows)."""
    reasons = encoded["skip_reason"]
    truncated = encoded["truncated"]
    counts = Counter(r for r in reasons if r)
    good = [i for i, r in enumerate(reasons) if not r]
    return counts, good, sum(1 for i in good if truncated[i])


def bad_rows(encoded, limit: int) -> list[str]:
    """'file:line: reason: detail' of the first `limit` bad rows in file order."""
    out = []
    for i, reason in enumerate(encoded["skip_reason"]):
        if reason:
            rec = encoded[i]
            out.append(f"{rec['source']}:{rec['line']}: {reason}: {rec['skip_detail']}")
            if len(out) == limit:
                break
    return out


def first_bad(encoded) -> str | None:
    """'file:line: reason: detail' of the first bad row in file order, or None."""
    rows = bad_rows(encoded, 1)
    return rows[0] if rows else None
