"""`MultimodalPackingDataModule`: chat / text files -> packed multimodal micro-batches with document boundaries.

Pipeline: files --(sources: cached datasets stages)--> encoded samples --(planning.EpochPackPlan: training packs
re-planned every epoch in a random order seeded by (seed, epoch); evaluation packs first-fit-decreasing, once)-->
packs --(sampler.PackSampler: seeded per epoch, token-balanced per data-parallel rank, resumable)--> DataLoader
workers (decode images and videos, build the micro-batch dict described in `packing`).

Image and video paths in the rows resolve relative to the directory of the data file that holds them (for a
`save_to_disk` directory, the directory containing it); absolute paths and `../` are allowed. `http(s)://` references
are not fetched: such rows are skipped (`missing_image` / `missing_video`, saying so).

Media changes: the preprocessing cache re-checks every referenced image and video by size and mtime at each start
(`sources`, stage 3), so the start report counts the files as they are. A document whose media break during the run
is dropped from its pack in the worker and counted in `decode_skips` (per split and reason; see
`packing.PackDataset`); a pack left without documents is a micro-batch with zero targets.

Videos: a content item `{"type": "video", "video": [frame paths] | "frames/dir" | "clip.mp4", "fps": optional}` is
processed as transformers' Qwen3-VL video processor would, without torchvision (see `video.py`).

Embedded default: `model_path`, `train_path` and `val_path` accept the sentinel "embedded" (see
`qmoe_lightning.embedded`); with `train_path: embedded` and neither `val_path` nor `val_fraction`, the embedded
validation split is used.

Resume: Lightning stores `state_dict()` in checkpoints and calls `load_state_dict()` on restore; the position is
(epoch, micro-batches consumed by this rank), counted in `on_before_batch_transfer`. If the LightningModule also
overrides `on_before_batch_transfer`, Lightning calls only the module's hook: call
`trainer.datamodule.on_before_batch_transfer(batch, idx)` from it to keep resume exact.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qmoe_lightning.embedded import SENTINEL, embedded_model_name, resolve_path

from .encoding import TRUNCATED, Encoder
from .packing import PackDataset
from .planning import EpochPackPlan
from .processor import local_model_dir
from .prompts import PromptDataset
from .sampler import PackSampler
from .sources import bad_rows, column, encode_files, first_bad, skip_summary

log = logging.getLogger(__name__)


def _identity(batch):
    return batch


class MultimodalPackingDataModule(LightningDataModule):
    def __init__(
        self,
        model_path: str | None = None,
        train_path: str | list[str] = SENTINEL,
        val_path: str | list[str] | None = None,
        val_fraction: float = 0.0,
        test_path: str | list[str] | None = None,
        predict_path: str | list[str] | None = None,
        max_tokens: int = 4096,
        pad_to_multiple_of: int = 64,
        num_workers: int = 2,
        seed: int = 0,
        labels: str = "assistant",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
        video_fps: float | None = None,
        too_long: str = "truncate",
        strict: bool = False,
        balance_visual_tokens: bool = False,
        shuffle: bool = True,
        cache_dir: str | None = None,
        embedded_cache_dir: str | None = None,
        preprocess_num_proc: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        """
        Args:
            model_path: model directory with the processor (tokenizer, chat template, image processor), or "embedded".
                None (default): the model's own -- `cli.py` sets it to `model.pretrained` (or `model.processor_source`),
                so the data is tokenised for the model that trains on it; used alone, None means "embedded".
            train_path / val_path: JSONL / JSON / Parquet file, glob, `save_to_disk` dir, or a list; or "embedded".
                Image / video paths inside resolve relative to the data file's directory, or are absolute.
            val_fraction: share of the training samples held out for validation when `val_path` is not given.
            test_path: data for `cli.py test` (same forms; "embedded" is the embedded held-out split).
            predict_path: prompts for `cli.py predict` (same forms and messages format; "embedded" is the embedded
                held-out split). A final assistant turn is the reference answer; rows without one are only answered.
            max_tokens: pack size in tokens (a multiple of `pad_to_multiple_of`).
            pad_to_multiple_of: the tail padding rounds each packed row up to this multiple.
            labels: "assistant" (assistant turns only) or "all".
            min_pixels / max_pixels: image pixel bounds (default: the image processor's).
            video_min_pixels / video_max_pixels: video pixel bounds over the whole clip, frames x height x width
                (default: the video processor config's `size`).
            video_fps: frame rate of frame-list videos whose item has no "fps" key; it only sets the `<t seconds>`
                timestamps (None: transformers' fallback of 24 fps).
            too_long: samples longer than max_tokens are "truncate"d or "drop"ped (both counted).
            strict: fail at the first bad sample (file:line and reason) instead of skipping and counting it.
            balance_visual_tokens: spread vision tokens evenly over packs.
            shuffle: training packs re-planned every epoch from a random document order (seed, epoch) and drawn in
                a random order; False: first-fit-decreasing packs, planned once, in plan order.
            cache_dir: datasets cache dir for the preprocessing stages (default: datasets' default).
            embedded_cache_dir: where the embedded default is built (default: ~/.cache/qmoe_lightning).
            preprocess_num_proc: processes for the encoding stage.
            rank / world_size: data-parallel coordinates; default from the trainer (or 0 / 1 without one).
        """
        super().__init__()
        if max_tokens % max(pad_to_multiple_of, 1):
            raise ValueError(f"max_tokens={max_tokens} must be a multiple of pad_to_multiple_of={pad_to_multiple_of}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.model_path, self.train_path, self.val_path, self.test_path = model_path, train_path, val_path, test_path
        self.predict_path = predict_path
        self.val_fraction, self.max_tokens, self.pad_to_multiple_of = val_fraction, max_tokens, pad_to_multiple_of
        self.num_workers, self.seed, self.labels, self.too_long = num_workers, seed, labels, too_long
        self.min_pixels, self.max_pixels, self.strict = min_pixels, max_pixels, strict
        self.video_min_pixels, self.video_max_pixels, self.video_fps = video_min_pixels, video_max_pixels, video_fps
        self.balance_visual_tokens, self.shuffle, self.cache_dir = balance_visual_tokens, shuffle, cache_dir
        self.embedded_cache_dir, self.preprocess_num_proc = embedded_cache_dir, preprocess_num_proc
        self._rank, self._world_size = rank, world_size
        self.stats: dict[str, dict[str, int]] = {}
        # documents dropped in the workers because their media broke during the run: split -> reason -> count
        self.decode_skips: dict[str, Counter] = {}
        self.train_dataset: PackDataset | None = None
        self.val_dataset: PackDataset | None = None
        self.test_dataset: PackDataset | None = None
        self.predict_dataset: PromptDataset | None = None
        self.train_sampler: PackSampler | None = None
        self._pending_state: dict | None = None
        self.encoder: Encoder | None = None

    # ------------------------------------------------------------------ preparation
    def _resolved_model(self) -> str:
        # a hub id becomes the local snapshot of its processor files: tokenising, the cache key and the chat
        # template read files (a bare "org/name" failed in os.listdir before anything was fetched)
        return local_model_dir(str(resolve_path(SENTINEL if self.model_path is None else self.model_path, "model",
                                                self.embedded_cache_dir)))

    def _resolved(self):
        emb = self.embedded_cache_dir
        model = self._resolved_model()
        train = resolve_path(self.train_path, "train", emb)
        val = resolve_path(self.val_path, "val", emb)
        if val is None and self.val_fraction == 0 and embedded_model_name(self.train_path) is not None:
            val = resolve_path(SENTINEL, "val", emb)
        return str(model), train, val

    def _test_spec(self):
        return resolve_path(self.test_path, "val", self.embedded_cache_dir)

    def _predict_spec(self):
        return resolve_path(self.predict_path, "val", self.embedded_cache_dir)

    def _encoder(self, model_dir: str) -> Encoder:
        return Encoder(model_dir, self.max_tokens, self.labels, self.too_long, self.min_pixels, self.max_pixels,
                       self.video_min_pixels, self.video_max_pixels, self.video_fps)

    def prepare_data(self) -> None:
        """Local rank 0 only (Lightning): build the embedded default and fill the preprocessing cache."""
        if self.trainer is not None and self.trainer.predicting:  # predict reads its prompts only
            if (spec := self._predict_spec()) is not None:
                encode_files(spec, self._encoder(self._resolved_model()), self.cache_dir, self.preprocess_num_proc,
                             prompts=True)
            return
        model_dir, train, val = self._resolved()
        encoder = self._encoder(model_dir)
        for spec in (train, val, self._test_spec()):
            if spec is not None:
                encode_files(spec, encoder, self.cache_dir, self.preprocess_num_proc)

    def _encode_split(self, name: str, spec, encoder: Encoder, prompts: bool = False):
        """-> (every encoded row, bad ones included; skip counts by reason; indices of the good rows; files).
        Strict mode fails at the first bad row; the counts go to `self.stats[name]`."""
        encoded, files = encode_files(spec, encoder, self.cache_dir, self.preprocess_num_proc, prompts=prompts)
        if self.strict and (bad := first_bad(encoded)) is not None:
            raise ValueError(f"strict mode: bad {name} sample at {bad}")
        counts, good, truncated = skip_summary(encoded)
        stats = dict(sorted(counts.items()))
        stats["ok"] = len(good)
        if truncated:
            stats[TRUNCATED] = truncated
        self.stats[name] = stats
        return encoded, counts, good, files

    def _load_split(self, name: str, spec, encoder: Encoder):
        encoded, counts, good, files = self._encode_split(name, spec, encoder)
        if not good:
            why = ", ".join(f"{k}={v}" for k, v in counts.items()) or "the files hold no rows"
            raise ValueError(f"the {name} dataset is empty after filtering ({len(encoded)} rows read from "
                             f"{len(files)} file(s): {why}); see the reasons above or run with strict=True")
        return encoded.select(good) if len(good) < len(encoded) else encoded

    def _coords(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return int(self._rank or 0), int(self._world_size or 1)
        trainer = self.trainer  # LightningDataModule declares it: None until a Trainer attaches the module
        if trainer is not None:
            kwargs = trainer.distributed_sampler_kwargs or {}
            return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # prompts only: no training data is read (or required to exist)
            self.encoder = self.encoder or self._encoder(self._resolved_model())
            return
        if self.train_dataset is not None:
            return
        model_dir, train_spec, val_spec = self._resolved()
        encoder = self.encoder = self._encoder(model_dir)  # the LightningModule checks it fits its model
        train = self._load_split("train", train_spec, encoder)
        val = self._load_split("val", val_spec, encoder) if val_spec is not None else None
        if val is None and self.val_fraction > 0:
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(len(train), generator=g).tolist()
            n_val = max(1, int(round(len(train) * self.val_fraction)))
            if n_val >= len(train):
                raise ValueError(f"val_fraction={self.val_fraction} leaves no training samples ({len(train)} total)")
            val, train = train.select(sorted(perm[:n_val])), train.select(sorted(perm[n_val:]))
            self.stats["val"] = {"ok": len(val), "from_train_fraction": n_val}
            self.stats["train"]["ok"] = len(train)
        self.train_dataset = self._pack(train, encoder, shuffle=self.shuffle)
        self.val_dataset = self._pack(val, encoder) if val is not None else None
        self._log_summary()
        rank, world = self._coords()
        self.train_sampler = PackSampler(self.train_dataset.plan, world, rank, shuffle=self.shuffle, seed=self.seed)
        if self._pending_state is not None:
            self.train_sampler.load_state_dict(self._pending_state)
            self._pending_state = None

    def _pack(self, records, encoder: Encoder, shuffle: bool = False) -> PackDataset:
        """shuffle: a training plan (random order, re-planned per epoch); else first-fit-decreasing, once."""
        lengths = column(records, "num_tokens")
        plan = EpochPackPlan(lengths, self.max_tokens, column(records, "num_visual_tokens"), self.balance_visual_tokens,
                             shuffle=shuffle, seed=self.seed)
        ds = PackDataset(records, plan, encoder, self.pad_to_multiple_of, strict=self.strict)
        padded = sum(-(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of for t in plan.pack_tokens(0))
        ds.fill = sum(lengths) / max(1, padded)  # epoch 0's; later epochs differ in the third decimal
        ds.num_tokens = int(sum(lengths))
        return ds

    def _log_summary(self) -> None:
        for name, ds in (("train", self.train_dataset), ("val", self.val_dataset)):
            if ds is None:
                continue
            stats = self.stats.get(name, {})
            skipped = {k: v for k, v in stats.items() if k not in ("ok", TRUNCATED, "from_train_fraction")}
            msg = (f"{name} data: {stats.get('ok', 0)} samples, {ds.num_tokens} tokens in {len(ds)} packs of "
                   f"{self.max_tokens} (non-pad fraction {ds.fill:.4f}); skipped {sum(skipped.values())}"
                   f"{' ' + str(skipped) if skipped else ''}; truncated {stats.get(TRUNCATED, 0)}")
            (rank_zero_warn if skipped else rank_zero_info)(msg)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: PackDataset, sampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers, collate_fn=_identity,
            persistent_workers=self.num_workers > 0, prefetch_factor=2 if self.num_workers > 0 else None,
        )

    def train_dataloader(self):
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.train_sampler)

    def test_dataloader(self):
        if self.test_dataset is None:
            spec = self._test_spec()
            if spec is None:
                raise ValueError("no test data: set data.test_path (a data file, glob, list, or 'embedded')")
            encoder = self._encoder(self._resolved_model())
            self.test_dataset = self._pack(self._load_split("test", spec, encoder), encoder)
        rank, world = self._coords()
        return self._loader(self.test_dataset, PackSampler(self.test_dataset.plan, world, rank, shuffle=False,
                                                           seed=self.seed))

    def predict_dataloader(self):
        """One prompt per micro-batch, in file order (see `prompts.PromptDataset`)."""
        if self.predict_dataset is None:
            spec = self._predict_spec()
            if spec is None:
                raise ValueError("no prompts: set data.predict_path (a data file, glob, list, or 'embedded')")
            encoder = self.encoder or self._encoder(self._resolved_model())
            # every row is kept: a skipped one becomes a predictions.jsonl row with its reason, not a gap
            encoded, counts, good, _ = self._encode_split("predict", spec, encoder, prompts=True)
            self.predict_dataset = PromptDataset(encoded, encoder, strict=self.strict)
            msg = f"predict data: {len(good)} prompts"
            if counts:
                msg += (f"; {sum(counts.values())} rows cannot be answered {dict(counts)} (each gets a "
                        f"predictions.jsonl row with its error), first: " + "; ".join(bad_rows(encoded, 3)))
            (rank_zero_warn if counts else rank_zero_info)(msg)
        return torch.utils.data.DataLoader(
            self.predict_dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_identity,
            prefetch_factor=2 if self.num_workers > 0 else None)

    def val_dataloader(self):
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        rank, world = self._coords()
        return self._loader(self.val_dataset, PackSampler(self.val_dataset.plan, world, rank, shuffle=False,
                                                          seed=self.seed))

    # ------------------------------------------------------------------ resume
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        training = trainer is None or trainer.training
        if self.train_sampler is not None and training:
            self.train_sampler.mark_consumed()
        skips = getattr(batch, "decode_skips", None)  # set by PackDataset in the worker
        if skips:
            split = "train" if training else "test" if trainer.testing else "val"
            self.decode_skips.setdefault(split, Counter()).update(skips)
            rank_zero_warn(f"{split} data: documents dropped at decoding so far (their images or videos changed "
                           f"since preparation): {dict(self.decode_skips[split])}")
        return batch

    def state_dict(self) -> dict:
        if self.train_sampler is None:
            return {"sampler": dict(self._pending_state)} if self._pending_state else {}
        return {"sampler": self.train_sampler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("sampler")
        if state is None:
            return
        if self.train_sampler is None:
            self._pending_state = state  # setup() has not run yet on restore
        else:
            self.train_sampler.load_state_dict(state)

