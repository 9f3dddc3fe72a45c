"""`PackedBatch`: the DataModule emits it, the models take it (as transformers' keyword arguments too), a dict with
a key outside the contract is refused, and Lightning's device transfer keeps it one."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities import move_data_to_device
from test_app_common import embedded_model_dir, make_datamodule, small_data  # noqa: F401  (fixture)

from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration
from qmoe_lightning.models.batch import PackedBatch


def test_model_takes_the_packed_batch_as_it_takes_its_tensors(small_data, tmp_path):
    dm = make_datamodule(small_data, tmp_path / "cache")
    dm.setup("fit")
    batch = dm.train_dataset[0]
    assert isinstance(batch, PackedBatch) and batch.pixel_values is not None and batch.num_documents > 1
    assert batch.real_tokens == int(batch.attention_mask.sum())
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(embedded_model_dir())
    with torch.no_grad():
        a = model(batch, num_items_in_batch=1)
        b = model(**batch.model_inputs(), num_items_in_batch=1)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    with pytest.raises(TypeError, match="beside a PackedBatch"):
        model(batch, labels=batch.labels)
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, PackedBatch) and moved.documents == batch.documents
    # the dict form: read access stays, keys outside the contract are refused
    assert batch["input_ids"] is batch.input_ids and batch.get("nothing") is None and "labels" in batch
    with pytest.raises(KeyError, match="has no \\['position'\\]"):
        PackedBatch.from_dict({"input_ids": batch.input_ids, "position": batch.position_ids})
