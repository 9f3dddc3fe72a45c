"""`DataMatchesModel`: the DataModule's tokenizer and vision placeholders must be the model's, checked before any
step of fit / validate / test / predict.

Why: a tokenizer of another model trains on garbage ids without any error (ids past the embedding are an index
error only on some devices, ids inside it are silently wrong), and image placeholders the model does not replace
leave the vision tower unused. The check is cheap (a vocabulary length and two ids). The CLI adds it to every run.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from data_modules.datamodule import MultimodalPackingDataModule

from .module_contract import require_qmoe_module


def data_matches_model_problems(encoder, model) -> list[str]:
    """What in the DataModule's encoder does not fit the native `model` (empty: it fits)."""
    vocab, rows = len(encoder.processor.tokenizer), int(model.text_config.vocab_size)
    problems = []
    if vocab > rows:
        problems.append(f"its tokenizer has {vocab} tokens but the model embeds {rows}")
    for name, have in (("image_token_id", encoder.image_token_id), ("video_token_id", encoder.video_token_id)):
        want = getattr(model.config, name, None)  # a transformers config; a text-only one has neither id
        if want is not None and have != want:
            problems.append(f"its {name} is {have}, the model's is {want}")
    return problems


class DataMatchesModel(Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        require_qmoe_module(pl_module, self)

    def _check(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, MultimodalPackingDataModule) or dm.encoder is None or pl_module.model is None:
            return  # another DataModule: it is its own business
        problems = data_matches_model_problems(dm.encoder, pl_module.model)
        if problems:
            raise ValueError(f"data.model_path {dm.encoder.model_dir} does not fit model.pretrained "
                             f"{pl_module.hparams.pretrained}: {'; '.join(problems)}. Leave data.model_path unset (it "
                             "then follows the model) or point it at the model's own processor.")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)
