"""Micro-batch assembly for packed multimodal rows: a pack (document indices, planned in `planning.py` from token
counts alone) -> decoded pixels -> one packed row.

A micro-batch is a `qmoe_lightning.models.batch.PackedBatch` (one packed row, batch dimension 1; the contract, with
shapes, is documented there). The tail padding is its own final document in `cu_seqlens` when there is any.
"""

from __future__ import annotations

import json
import logging

import torch

from qmoe_lightning.models.batch import PackedBatch
from qmoe_lightning.models.mrope_positions import mrope_position_ids_packed

from . import video as video_lib
from .encoding import CORRUPT_IMAGE, IGNORE, IMAGE_CHANGED, MISSING_IMAGE, VIDEO_CHANGED
from .images import to_8bit
from .video import CORRUPT_VIDEO, MISSING_VIDEO
from .planning import EpochPackPlan

log = logging.getLogger(__name__)


def padded_length(total: int, multiple: int) -> int:
    return -(-total // multiple) * multiple if multiple > 1 else total


def build_micro_batch(docs: list[dict], pad_token_id: int, image_token_id: int, video_token_id: int,
                      pad_to_multiple_of: int, spatial_merge_size: int) -> PackedBatch:
    """Concatenate encoded documents (dicts with input_ids, labels and optional pixel tensors) into one packed row."""
    ids, labels, lens = [], [], []
    pixel_values, image_grids, video_pixels, video_grids = [], [], [], []
    for doc in docs:
        doc_ids = list(doc["input_ids"])
        doc_labels = list(doc["labels"])
        doc_labels[0] = IGNORE  # the previous document's last token must not predict this document's first
        ids += doc_ids
        labels += doc_labels
        lens.append(len(doc_ids))
        if doc.get("pixel_values") is not None:
            pixel_values.append(doc["pixel_values"])
            image_grids.append(doc["image_grid_thw"])
        if doc.get("pixel_values_videos") is not None:
            video_pixels.append(doc["pixel_values_videos"])
            video_grids.append(doc["video_grid_thw"])
    total = len(ids)
    padded = padded_length(max(total, 1), pad_to_multiple_of)
    if padded > total:  # tail padding is one extra document so no real token attends to it or vice versa
        ids += [pad_token_id] * (padded - total)
        labels += [IGNORE] * (padded - total)
        lens.append(padded - total)
    input_ids = torch.tensor(ids, dtype=torch.long)
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    if total < padded:
        types[total:] = 0  # the pad id could in principle collide with a vision id; padding is text
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    image_grid_thw = torch.cat(image_grids).long() if image_grids else None
    video_grid_thw = torch.cat(video_grids).long() if video_grids else None
    position_ids = mrope_position_ids_packed(types, cu, image_grid_thw, video_grid_thw, spatial_merge_size)
    label_tensor = torch.tensor(labels, dtype=torch.long)
    attention_mask = torch.zeros(1, padded, dtype=torch.long)
    attention_mask[0, :total] = 1
    return PackedBatch(
        input_ids=input_ids.unsqueeze(0),
        labels=label_tensor.unsqueeze(0),
        mm_token_type_ids=types.unsqueeze(0),
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=int(max(lens)),
        pixel_values=torch.cat(pixel_values) if pixel_values else None,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=torch.cat(video_pixels) if video_pixels else None,
        video_grid_thw=video_grid_thw,
        num_label_tokens=int((label_tensor != IGNORE).sum()),
        num_documents=len(docs),
        attention_mask=attention_mask,
    )


class PackDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by PACK CONTENTS: `dataset[(i, j, ...)]` decodes the images and videos of documents
    i, j, ... (in the DataLoader worker) and returns their micro-batch dict; `PackSampler` yields these tuples from
    `plan`, the epoch's packing plan (None: a dataset indexed by hand). `dataset[p]` (an int) is pack p of epoch 0.

    A document whose image or video fails here although it passed preparation (the file was deleted, replaced or
    damaged since; preparation re-checks the media's size and mtime at every start, so this is a change during the
    run) is left out of the pack with a warning naming file:line, and counted: the micro-batch's `decode_skips`
    attribute maps each reason (`missing_image` / `missing_video`: the file is gone; `image_changed` /
    `video_changed`: it now gives another size than planned; `corrupt_image` / `corrupt_video`: it no longer
    decodes) to the number of documents dropped, and `MultimodalPackingDataModule` adds them up. A pack whose
    documents all drop out is a micro-batch of tail padding only, with zero targets. `strict` raises instead."""

    def __init__(self, records, plan: EpochPackPlan | None, encoder, pad_to_multiple_of: int, strict: bool = False):
        self.records, self.plan, self.encoder = records, plan, encoder
        self.pad_to_multiple_of, self.strict = pad_to_multiple_of, strict

    def __len__(self) -> int:
        if self.plan is None:
            raise TypeError("a PackDataset without a plan has no length")
        return self.plan.num_packs

    def _load_images(self, rec: dict, doc: dict) -> None:
        from PIL import Image

        images = []
        for path in rec["images"]:
            with Image.open(path) as im:
                im.load()
                # as read (the processor's convert_rgb composites transparency on white), high bit depths scaled
                images.append(to_8bit(im))
        out = self.encoder.processor.image_processor(images, return_tensors="pt", **self.encoder.image_size_kwargs())
        grid = out["image_grid_thw"]
        if grid.tolist() != rec["image_grids"]:
            raise DecodeError(IMAGE_CHANGED, ValueError(f"image grid {grid.tolist()} differs from the planned "
                                                        f"{rec['image_grids']}: an image changed since preparation"))
        doc["pixel_values"], doc["image_grid_thw"] = out["pixel_values"], grid

    def _load_videos(self, rec: dict, doc: dict) -> None:
        cfg = self.encoder.video_config
        pixels, grids = [], []
        for spec, planned_grid in zip(rec["videos"], rec["video_grids"]):
            planned = json.loads(spec)
            values, grid = video_lib.preprocess(video_lib.decode(planned), cfg)
            if grid != list(planned_grid):
                raise DecodeError(VIDEO_CHANGED, ValueError(f"video grid {grid} differs from the planned "
                                                            f"{list(planned_grid)}: a video changed since preparation"))
            pixels.append(values)
            grids.append(grid)
        doc["pixel_values_videos"] = torch.cat(pixels)
        doc["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)

    def load_document(self, rec: dict) -> dict:
        doc = {"input_ids": rec["input_ids"], "labels": rec["labels"]}
        for key, load, missing, corrupt in (("images", self._load_images, MISSING_IMAGE, CORRUPT_IMAGE),
                                            ("videos", self._load_videos, MISSING_VIDEO, CORRUPT_VIDEO)):
            if rec.get(key):
                try:
                    load(rec, doc)
                except DecodeError:
                    raise
                except FileNotFoundError as err:
                    raise DecodeError(missing, err) from err
                except Exception as err:
                    raise DecodeError(corrupt, err) from err
        return doc

    def __getitem__(self, documents: tuple[int, ...]) -> dict:
        if isinstance(documents, int):  # by hand: pack p of epoch 0's plan (training re-plans every epoch)
            documents = self.plan.packs(0)[documents]
        enc = self.encoder
        enc.processor  # loads lazily in each worker
        docs, kept, skips = [], [], {}
        for i in documents:
            rec = self.records[int(i)]
            try:
                docs.append(self.load_document(rec))
                kept.append(int(i))
            except DecodeError as err:
                where = f"{rec['source']}:{rec['line']}"
                if self.strict:
                    raise ValueError(f"{where}: {err.reason}: {err.error}") from err.error
                skips[err.reason] = skips.get(err.reason, 0) + 1
                log.warning("skipping %s (a pack of %d documents): %s: failed to decode: %s", where, len(documents),
                            err.reason, err.error)
        tok = enc.processor.tokenizer
        batch = build_micro_batch(docs, tok.pad_token_id, enc.image_token_id, enc.video_token_id,
                                  self.pad_to_multiple_of, enc.merge)
        batch.documents = kept  # indices into the split's records of the documents in the row, in row order
        batch.decode_skips = skips  # reason -> documents of this pack dropped at decoding (see the class doc)
        return batch


class DecodeError(Exception):
    """An image or video of a document that passed the header check at preparation failed to decode."""

    def __init__(self, reason: str, error: Exception):
        super().__init__(f"{reason}: {error}")
        self.reason, self.error = reason, error
