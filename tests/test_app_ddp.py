"""Data-parallel normalisation: 2 DDP ranks (CPU, gloo) with one micro-batch each give the same gradient as one
process accumulating both micro-batches, although the two micro-batches hold different numbers of target tokens
(DDP averages gradients over ranks; the module rescales by world_size / global token count)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_app_common import make_datamodule, make_trainer, small_data  # noqa: F401  (fixture)
from test_app_training import GradCapture, _grads_after_one_step, _two_micro_batches

pytestmark = pytest.mark.multiprocess


class _PerRank(torch.utils.data.Dataset):
    """Rank r sees micro-batch r (no distributed sampler: the split is explicit)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return 1

    def __getitem__(self, i):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return self.batches[rank]


class SavingGradCapture(GradCapture):
    def __init__(self, out_path: str, **kwargs):
        super().__init__(**kwargs)
        self.out_path = out_path

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.trainer.is_global_zero:
            torch.save({"grads": self.grads, "targets": self.last_step.global_targets}, self.out_path)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ddp_ranks_equal_one_process_accumulating(tmp_path, small_data):
    a, b = _two_micro_batches(make_datamodule(small_data, tmp_path / "cache", max_tokens=128))
    assert a["num_label_tokens"] != b["num_label_tokens"]
    single, _ = _grads_after_one_step(tmp_path / "single", [a, b], accumulate=2, aux_loss_coef=0.0)

    out = tmp_path / "ddp_grads.pt"
    module = SavingGradCapture(str(out), pretrained="embedded", lr=0.0, aux_loss_coef=0.0)
    loader = torch.utils.data.DataLoader(_PerRank([a, b]), batch_size=None, shuffle=False)
    trainer = make_trainer(tmp_path / "ddp", max_steps=1, strategy="ddp_spawn", devices=2,
                           use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=loader)
    # ddp_spawn leaves the port of its rendezvous in this process's environment (conftest puts it back after the
    # test, see there)
    assert os.environ.get("MASTER_PORT") == str(trainer.strategy.cluster_environment.main_port)
    saved = torch.load(out)
    assert saved["targets"] == a["num_label_tokens"] + b["num_label_tokens"]
    assert saved["grads"].keys() == single.keys()
    for name, g in single.items():
        torch.testing.assert_close(saved["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
