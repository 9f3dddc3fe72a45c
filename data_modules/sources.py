"""Reading conversation files into a cached, memory-mapped `datasets.Dataset` of encoded samples.

Two cached stages (Arrow files under the datasets cache dir, reused while inputs and options are unchanged):
1. raw rows: every file of the spec (JSONL, JSON, Parquet, or a `save_to_disk` directory) becomes rows
   {row (JSON text), source, line, base_dir, skip_reason, skip_detail}. JSONL is parsed line by line here, not by
   the datasets JSON builder, because that builder aborts the whole file on one bad line and loses line numbers.
   The cache key includes every file's size and mtime, so edited files are re-read.
2. encoded rows: `Encoder.encode` through `Dataset.map` (optionally num_proc workers), with an explicit fingerprint
   made of the stage-1 fingerprint, the processor files' contents and the encoding options. Each row also records
   the images and videos it references (`media`: paths, frame directories and their frames; `media_size` /
   `media_mtime`: their size and mtime_ns when it was encoded, -1 for a file that did not exist).
3. media check, at every start: one `os.stat` per distinct referenced path (no decoding; ~1 s per 100k files on a
   local disk), compared with what stage 2 recorded. A file created, replaced, touched or deleted since makes the
   rows that reference it encode again -- those rows only, cached under a fingerprint of stage 2 plus the changed
   paths' new stamps -- and they replace the stale rows, so every verdict (ok / missing_image / corrupt_image /
   the video reasons) and the start report's counts follow the files as they are now. The check is always made
   against stage 2, so a second change re-encodes the rows of both changes (once, then cached).

Bad rows are kept in the cache with their `skip_reason` (so a cached run reports the same counts and strict mode
still fails on them) and filtered out with `select`, which keeps the data memory-mapped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import datasets

from .encoding import EMPTY_FILE, INVALID_JSON, INVALID_UTF8, BadSample, Encoder, media_paths
from .video import decoder_available as video_decoder_available

log = logging.getLogger(__name__)

READER_VERSION = 3  # 2: invalid UTF-8 counted per row; 3: a UTF-8 BOM accepted, invalid JSON's column in the line
# 2: video columns; 3: roles checked, images decoded at preparation; 4: prompt reference ids; 5: media stamps, URLs
# refused, non-string roles are bad_role
ENCODER_VERSION = 5
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Windows editors write one): skipped at the start of a file


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
            text = f.read().removeprefix(BOM).decode("utf-8", errors="surrogateescape")
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
                if i == 1:
                    raw = raw.removeprefix(BOM)
                raw = raw.rstrip(b"\r\n")  # a row cut short fails at its end, not at "line 2 column 1" after it
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
                except json.JSONDecodeError as err:  # one line: the column is the character position + 1
                    yield _row(None, path, i, base, INVALID_JSON, f"{err.msg} at column {err.pos + 1}")
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
    "media": datasets.List(datasets.Value("string")),  # referenced image / video paths (encoding.media_paths)
    "media_size": datasets.List(datasets.Value("int64")),  # their size and mtime_ns at encoding, -1: absent
    "media_mtime": datasets.List(datasets.Value("int64")),
})
# prompts of `cli.py predict` (Encoder.encode_prompt): the reference answer (None without one) and the row's "id"
PROMPT_FEATURES = datasets.Features({**ENCODED_FEATURES, "reference": datasets.Value("string"),
                                     "reference_ids": datasets.List(datasets.Value("int32")),
                                     "prompt_id": datasets.Value("string")})
_EMPTY = {"input_ids": [], "labels": [], "images": [], "image_grids": [], "videos": [], "video_grids": [],
          "num_tokens": 0, "num_visual_tokens": 0, "truncated": False}


def media_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a referenced file or directory; (-1, -1) when it does not exist (or cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _encode_example(example: dict, encoder: Encoder, prompts: bool = False) -> dict:
    out = {"source": example["source"], "line": example["line"], "skip_reason": example["skip_reason"],
           "skip_detail": example["skip_detail"], "media": [], "media_size": [], "media_mtime": []}
    empty = {**_EMPTY, "reference": None, "reference_ids": None, "prompt_id": None} if prompts else _EMPTY
    if example["skip_reason"]:
        return {**empty, **out}
    row = json.loads(example["row"])
    # stamped before encoding: a file that changes while the row encodes differs from its stamp at the next start
    media = media_paths(row, example["base_dir"])
    stamps = [media_stamp(p) for p in media]
    out.update(media=media, media_size=[s for s, _ in stamps], media_mtime=[m for _, m in stamps])
    encode = encoder.encode_prompt if prompts else encoder.encode
    try:
        return {**encode(row, example["base_dir"]), **out}
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
    return _refresh_changed_media(encoded, raw, encoder, prompts), files


def changed_media(encoded) -> tuple[list[int], list[list]]:
    """-> (rows whose referenced media differ from their stamps at encoding, [[path, size, mtime_ns]] of the changed
    paths as they are now), by one stat per distinct path (see the module doc, stage 3)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if encoded._indices is not None:
        raise ValueError("changed_media reads the stage-2 table itself; pass it before any select")
    table = encoded.data
    media = table.column("media").combine_chunks()
    flat = media.flatten()
    if len(flat) == 0:
        return [], []
    parents = pc.list_parent_indices(media)
    paths = pc.unique(flat)
    now = {p: media_stamp(p) for p in paths.to_pylist()}
    at = pc.index_in(flat, value_set=paths)
    size_now = pa.array([s for s, _ in now.values()], pa.int64()).take(at)
    mtime_now = pa.array([m for _, m in now.values()], pa.int64()).take(at)
    differs = pc.or_(pc.not_equal(size_now, table.column("media_size").combine_chunks().flatten()),
                     pc.not_equal(mtime_now, table.column("media_mtime").combine_chunks().flatten()))
    if not pc.any(differs).as_py():
        return [], []
    rows = sorted(pc.unique(pc.filter(parents, differs)).to_pylist())
    changed = sorted(set(pc.filter(flat, differs).to_pylist()))
    return rows, [[p, *now[p]] for p in changed]


def _refresh_changed_media(encoded, raw, encoder: Encoder, prompts: bool):
    """Stage 3 of the module doc: the rows whose images or videos changed since stage 2, encoded again."""
    rows, changed = changed_media(encoded)
    if not rows:
        return encoded
    log.info("%d referenced image/video file(s) changed since the preprocessing cache was written (first: %s); "
             "encoding the %d row(s) that use them again", len(changed), changed[0][0], len(rows))
    fp = hashlib.sha256(json.dumps([encoded._fingerprint, changed]).encode()).hexdigest()[:16]
    fixed = raw.select(rows).map(_encode_example, fn_kwargs={"encoder": encoder, "prompts": prompts},
                                 remove_columns=raw.column_names, features=encoded.features, new_fingerprint=fp,
                                 desc="encoding rows whose media changed")
    order = list(range(len(encoded)))
    for k, row in enumerate(rows):
        order[row] = len(encoded) + k
    return datasets.concatenate_datasets([encoded, fixed]).select(order)


def column(dataset, name: str) -> list:
    """One column of a datasets table as a Python list, through Arrow. Footgun: `dataset[name]` is a lazy `Column` in
    datasets 5 that reads value by value when iterated or indexed, so a million-row corpus spent minutes in the
    loops over it (`bench/bench_data_scale.py`); Arrow hands the whole column over at once."""
    return dataset.with_format("arrow")[name].to_pylist()


def skip_summary(encoded) -> tuple[Counter, list[int], int]:
    """-> (skip counts per reason, indices of good rows, number of truncated good rows)."""
    reasons = column(encoded, "skip_reason")
    truncated = column(encoded, "truncated")
    counts = Counter(r for r in reasons if r)
    good = [i for i, r in enumerate(reasons) if not r]
    return counts, good, sum(1 for i in good if truncated[i])


def bad_rows(encoded, limit: int) -> list[str]:
    """'file:line: reason: detail' of the first `limit` bad rows in file order."""
    out = []
    for i, reason in enumerate(column(encoded, "skip_reason")):
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
