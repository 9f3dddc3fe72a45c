"""`LoraExport` Lightning callback: checks at fit start that adapters exist and writes the PEFT adapter
(`<default_root_dir>/hf_adapter/`) at the end of fit (the per-group trainable table is printed by the module when
it applies LoRA).

It only reads `pl_module.model` (the native model with adapters applied by `apply_lora` in `configure_model`), so a
run without adapters fails loudly at fit start instead of writing nothing at the end. The merged export
(`hf_export/`) stays with `callbacks.HFExport`, which must call `qmoe_lightning.lora.save_merged_pretrained`: a plain
`save_pretrained` of a LoRA model would write the adapter tensors under names transformers does not know.

`base_model_name_or_path` in adapter_config.json: the `base_model_name_or_path` argument, else the module's
`hparams.pretrained` (a hub id stays a hub id; `embedded` resolves to the built embedded checkpoint directory).
Rank 0 writes, every rank waits at a barrier. Sharded runs (FSDP2 / expert parallel): every rank gathers the
adapters (full (E, ...) expert adapters) in the same order, rank 0 writes, as HFExport. As HFExport, non-finite
weights are refused on every rank before anything is written, files a user added to the directory are kept, and a
run that ends in an exception writes no adapter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from qmoe_lightning.export_dir import prepare_target, refuse_nonfinite_model
from qmoe_lightning.lora import LoraConfig, has_lora, save_peft_adapter
from qmoe_lightning.lora.peft_export import check_peft_expressible
from qmoe_lightning.parallel.state import full_tensor_fetcher, is_sharded_model

from .module_contract import require_qmoe_module
from .run_report import output_line


class LoraExport(pl.Callback):
    def __init__(self, dirpath: str | None = None, base_model_name_or_path: str | None = None):
        """
        Args:
            dirpath: adapter directory (default `<default_root_dir>/hf_adapter`).
            base_model_name_or_path: written into adapter_config.json (default: the module's `pretrained`).
        """
        self.dirpath = dirpath
        self.base_model_name_or_path = base_model_name_or_path
        self.last_export: Path | None = None

    def export_dir(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "hf_adapter"))

    def base_path(self, pl_module) -> str | None:
        if self.base_model_name_or_path:
            return self.base_model_name_or_path
        from qmoe_lightning.embedded import embedded_model_name, resolve_path

        hp = pl_module.hparams
        pretrained = hp.pretrained
        if embedded_model_name(pretrained) is not None:
            return str(resolve_path(pretrained, "model", hp.embedded_cache_dir))
        return None if pretrained is None else str(pretrained)

    def output_lines(self) -> list[str]:
        return [output_line("PEFT adapter", self.last_export)] if self.last_export is not None else []

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before any training: the target may only be a previous adapter export (see qmoe_lightning.export_dir)."""
        require_qmoe_module(pl_module, self)
        if stage == "fit":
            prepare_target(self.export_dir(trainer), trainer.default_root_dir, repair=trainer.is_global_zero)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not has_lora(pl_module.model):
            raise RuntimeError("LoraExport is configured but the model has no LoRA adapters (no `lora:` section?)")
        check_peft_expressible(pl_module.model)  # before training, not after it

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> Path:
        out = self.export_dir(trainer)
        model = pl_module.model
        config = LoraConfig.from_any(pl_module.hparams.lora)
        refuse_nonfinite_model(model, f"the PEFT adapter export {out}")
        t0 = time.perf_counter()
        if is_sharded_model(model):  # all ranks gather the adapters in the same order, rank 0 writes
            save_peft_adapter(model, out, self.base_path(pl_module), fetch=full_tensor_fetcher(model),
                              write=trainer.is_global_zero, lora_config=config)
        elif trainer.is_global_zero:
            save_peft_adapter(model, out, self.base_path(pl_module), lora_config=config)
        if trainer.is_global_zero:
            size = sum(f.stat().st_size for f in out.iterdir())
            rank_zero_info(f"PEFT adapter written to {out} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f}s")
        trainer.strategy.barrier("lora_export")
        self.last_export = out
        return out
