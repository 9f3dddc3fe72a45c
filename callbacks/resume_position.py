"""`ResumePosition`: a run resumed on another number of data-parallel ranks (a 2 x 2 checkpoint on one node of 4,
or on one process accumulating 4) continues its epoch where the checkpoint left it, data and gradient accumulation
alike.

The data sampler carries its position over (`data_modules/sampler.py`: the packs drawn so far, re-counted in
micro-batches per rank of the new layout). Lightning's fit loop keeps its own count of the epoch's micro-batches,
and that count decides where gradient accumulation ends an optimizer step (`current.ready % accumulate_grad_batches`).
Left at the old layout's count, one process resuming a 4-rank checkpoint at 2 micro-batches would step after 2 more
instead of 4: another optimizer step than the run it continues, without any error. This callback moves the loop's
counters by what the sampler moved, after the DataModule is restored and before Lightning restores its loops. The
CLI adds it to every run; on the same layout it does nothing.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from data_modules.datamodule import MultimodalPackingDataModule


class ResumePosition(Callback):
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, MultimodalPackingDataModule) or dm.train_sampler is None:
            return  # another DataModule keeps its own position
        moved = dm.train_sampler.resume_shift  # micro-batches per rank: the new layout's count - the saved one
        loops = checkpoint.get("loops") or {}
        progress = (loops.get("fit_loop") or {}).get("epoch_loop.batch_progress")
        if not moved or progress is None:
            return
        for scope in ("total", "current"):  # every counter by the same amount: Lightning's restart logic reads
            for key in progress[scope]:     # their differences (a checkpoint written at a batch's end)
                progress[scope][key] += moved
