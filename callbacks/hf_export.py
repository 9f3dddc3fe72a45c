"""`HFExport`: writes the trained model as a Hugging Face model directory, optionally pushes it to the Hub.

When: at the end of `fit` (`at_train_end`) and, optionally, every `every_n_steps` optimizer steps.
Where: `dirpath`, default `<default_root_dir>/hf_export` (the latest export replaces the previous one).
What: `model.save_pretrained` of the native model (LoRA adapters merged in, `lora.save_merged_pretrained`): the official fused safetensors layout, config.json,
generation_config.json, and the tokenizer / processor / chat-template files of the source checkpoint, so
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load it as is
(AutoProcessor of Qwen3-VL-style processors needs torchvision, a transformers requirement).
Safe (`qmoe_lightning.export_dir`): only a previous export of ours is ever replaced (a `dirpath` naming the run
directory, `.` or any other non-empty directory is an error at fit start, before training); the files are written
into a temporary sibling that is swapped into place, so a crash at any moment leaves the previous export (or the
new one), never a half-written or missing one; temporaries that killed exports left are removed at the next start.
Files a user added to the export directory (a model card README.md, notes) are carried into each new export.
Never from non-finite weights: every rank checks its weights first (one all-reduced flag) and all refuse together,
naming the tensor, leaving the previous export as it was; a run stopped by an exception (a non-finite step included)
does not export at all (Lightning calls `on_train_end` only when fit ends normally).

Hub push (`repo_id` set): after a successful local export, on global rank 0, through huggingface_hub with retries.
The token comes only from the environment variable named by `token_env` or the cached `hf auth login`, never
from configs. Large exports upload resumably (see qmoe_lightning.hub). A failed push is logged as an error and
recorded in `self.last_push`; it never raises and never deletes the local export, so training results are not lost
to a network problem. `push_on_every_export` (default False) also pushes the periodic exports.

Sharded runs (ExpertParallelStrategy: FSDP2 and / or expert parallel): every rank walks the state dict in the same
order and each tensor is all-gathered to its full (E, ...) shape (`parallel.state.full_tensor_fetcher`), merged if
it carries an adapter, and written by rank 0 into the current safetensors shard: the peak extra memory is one full
tensor per rank plus one shard on rank 0, never a full copy of the model. The files are the same as a
single-process export of the same weights (tests/test_parallel_export.py). A failure on rank 0 while writing
leaves the other ranks waiting in the next all-gather until the process-group timeout.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from qmoe_lightning.export_dir import prepare_target, refuse_nonfinite_model
from qmoe_lightning.hub import PushResult, push_folder_to_hub, retry_command
from qmoe_lightning.lora import save_merged_pretrained
from qmoe_lightning.parallel.state import full_tensor_fetcher, is_sharded_model

from .module_contract import require_qmoe_module
from .run_report import output_line

log = logging.getLogger(__name__)


class HFExport(pl.Callback):
    def __init__(
        self,
        dirpath: str | None = None,
        at_train_end: bool = True,
        every_n_steps: int | None = None,
        max_shard_size: str = "5GB",
        repo_id: str | None = None,
        private: bool = True,
        token_env: str = "HF_TOKEN",
        push_retries: int = 3,
        push_backoff_s: float = 5.0,
        push_on_every_export: bool = False,
        commit_message: str = "Fine-tuned with qmoe_lightning",
    ):
        """
        Args:
            dirpath: export directory (default `<default_root_dir>/hf_export`).
            at_train_end: export when fit ends.
            every_n_steps: also export every n optimizer steps (None: only at the end).
            max_shard_size: safetensors shard size ("5GB", "500MB", bytes).
            repo_id: push the final export to this Hub model repo ("org/name"); None: no push.
            private: create the Hub repo as private (when it does not exist yet).
            token_env: environment variable holding the Hub token (never put a token in a config).
            push_retries: attempts per push.
            push_backoff_s: wait before the second attempt, doubled after each failure.
            push_on_every_export: also push the periodic (every_n_steps) exports.
            commit_message: Hub commit message.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.dirpath = dirpath
        self.at_train_end = at_train_end
        self.every_n_steps = every_n_steps
        self.max_shard_size = max_shard_size
        self.repo_id = repo_id
        self.private = private
        self.token_env = token_env
        self.push_retries = push_retries
        self.push_backoff_s = push_backoff_s
        self.push_on_every_export = push_on_every_export
        self.commit_message = commit_message
        self.last_export: Path | None = None
        self.last_push: PushResult | None = None
        self._last_step_exported = -1

    def export_dir(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "hf_export"))

    def output_lines(self) -> list[str]:
        return [output_line("HF export", self.last_export)] if self.last_export is not None else []

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before any training: the target may only be a previous export; debris of killed exports goes."""
        require_qmoe_module(pl_module, self)
        if stage == "fit":
            prepare_target(self.export_dir(trainer), trainer.default_root_dir, repair=trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        step_done = not pl_module.step_in_progress  # not between accumulated micro-batches
        if (self.every_n_steps and step_done and step > 0 and step % self.every_n_steps == 0
                and step != self._last_step_exported):
            self.export(trainer, pl_module, push=self.push_on_every_export)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step_exported:
            self.export(trainer, pl_module, push=True)
        elif self.at_train_end and self.repo_id and self.last_export is not None and self.last_push is None:
            self._push(trainer)

    def export(self, trainer, pl_module, push: bool = True) -> Path | None:
        """Write the export (rank 0), wait for it on every rank, then push if configured."""
        out = self.export_dir(trainer)
        self._last_step_exported = trainer.global_step
        model = pl_module.model
        source = pl_module.checkpoint_source  # companion files, mtp.* passthrough (build_model)
        refuse_nonfinite_model(model, f"the HF export {out} (step {trainer.global_step})")
        t0 = time.perf_counter()
        # LoRA adapters are merged into the exported weights; a plain model is saved as is
        if is_sharded_model(model):
            # every rank walks the tensors in the same order (one all-gather each), rank 0 writes
            save_merged_pretrained(model, out, max_shard_size=self.max_shard_size, fetch=full_tensor_fetcher(model),
                                   write=trainer.is_global_zero, source=source)
        elif trainer.is_global_zero:
            save_merged_pretrained(model, out, max_shard_size=self.max_shard_size, source=source)
        rank_zero_info(f"HF export (step {trainer.global_step}) written to {out} in {time.perf_counter() - t0:.1f}s")
        trainer.strategy.barrier("hf_export")
        self.last_export = out
        if push and self.repo_id:
            self._push(trainer)
        return out

    def _push(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        result = push_folder_to_hub(self.last_export, self.repo_id, private=self.private, token_env=self.token_env,
                                    retries=self.push_retries, backoff_s=self.push_backoff_s,
                                    commit_message=f"{self.commit_message} (step {trainer.global_step})")
        self.last_push = result
        if result.ok:
            rank_zero_info(f"pushed {self.last_export} to the Hub repo {result.repo_id} ({result.url})")
        else:
            log.error("pushing %s to the Hub repo %s failed after %d attempt(s): %s. The local export is intact at "
                      "%s; push it later (an interrupted upload resumes) with `%s`.", self.last_export,
                      result.repo_id, result.attempts, result.error, self.last_export,
                      retry_command(self.last_export, result.repo_id))
