"""`PromptDataset`: the prompts of `cli.py predict`, one micro-batch per prompt (no packing: `generate` continues
one sequence, and a lone prompt needs no `cu_seqlens`).

Each item is the micro-batch dict of `packing.build_micro_batch` for the prompt alone, without tail padding
(input_ids, attention_mask, mm_token_type_ids, position_ids, pixel tensors and grids), plus:
    prompt_id str (the row's "id", else "<file name>:<line>"); source str ("<file>:<line>"); reference str | None
    (the row's final assistant turn); reference_ids list[int] | None (its target tokens: answer + end token);
    kind "image" | "video" | "text"; index int (the prompt's position, which seeds sampling); error str | None.
A row that could not be made into a prompt (skipped at preparation: bad schema, too long, missing image...) or
whose image / video failed to decode here is an item with `error` ("<reason>: <detail>") and no model inputs: it
is reported in predictions.jsonl, not generated and not silently dropped.
"""

from __future__ import annotations

import os

import torch

from .packing import DecodeError, PackDataset, build_micro_batch


class PromptDataset(torch.utils.data.Dataset):
    def __init__(self, records, encoder, strict: bool = False):
        """records: every encoded prompt row, skipped ones included (`skip_reason` set)."""
        self.records, self.encoder, self.strict = records, encoder, strict
        self._docs = PackDataset(records, None, encoder, pad_to_multiple_of=1, strict=strict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[int(index)]
        where = f"{rec['source']}:{rec['line']}"
        kind = "video" if rec["videos"] else "image" if rec["images"] else "text"
        info = {"prompt_id": rec["prompt_id"] or f"{os.path.basename(rec['source'])}:{rec['line']}", "source": where,
                "reference": rec["reference"], "reference_ids": rec["reference_ids"], "kind": kind,
                "index": int(index), "error": None}
        if rec["skip_reason"]:
            return {**info, "kind": None, "error": f"{rec['skip_reason']}: {rec['skip_detail']}"}
        enc = self.encoder
        enc.processor  # loads lazily in each worker
        try:
            doc = self._docs.load_document(rec)
        except DecodeError as err:
            if self.strict:
                raise ValueError(f"{where}: {err.reason}: {err.error}") from err.error
            return {**info, "error": f"{err.reason}: {err.error}"}
        batch = build_micro_batch([doc], enc.processor.tokenizer.pad_token_id, enc.image_token_id, enc.video_token_id,
                                  1, enc.merge)
        return {**batch, **info}
