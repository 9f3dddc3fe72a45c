"""Training semantics of QMoELightningModule through a real Lightning Trainer:

- gradient accumulation: 2 micro-batches accumulated give the gradient of ONE packed batch holding both (token-count
  normalisation over the window, not a mean of per-micro-batch means);
- the aux term follows its documented objective (coef * sum_i n_i aux_i / N);
- a fit interrupted after 3 steps and resumed with ckpt_path="last" continues the loss curve of an uninterrupted run;
- freeze switches and activation checkpointing.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from test_app_common import make_datamodule, make_trainer, small_data  # noqa: F401  (fixture)

from callbacks import RunCheckpoint
from qmoe_lightning.lightning_module import QMoELightningModule


def _two_micro_batches(dm):
    dm.setup("fit")
    ds = dm.train_dataset
    assert len(ds) >= 2
    first = ds[0]
    # a second micro-batch with a different number of targets: equal counts would hide a per-batch-mean bug
    for j in range(1, len(ds)):
        second = ds[j]
        if second["num_label_tokens"] != first["num_label_tokens"]:
            break
    return first, second


def _concat(a: dict, b: dict) -> dict:
    """One packed row holding the documents of both micro-batches (positions restart per document anyway)."""
    T = a["input_ids"].shape[1]
    out = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]], 1),
        "labels": torch.cat([a["labels"], b["labels"]], 1),
        "mm_token_type_ids": torch.cat([a["mm_token_type_ids"], b["mm_token_type_ids"]], 1),
        "position_ids": torch.cat([a["position_ids"], b["position_ids"]], 2),
        "cu_seqlens": torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + T]),
        "max_seqlen": max(a["max_seqlen"], b["max_seqlen"]),
        "num_label_tokens": a["num_label_tokens"] + b["num_label_tokens"],
    }
    for px, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [x for x in (a.get(px), b.get(px)) if x is not None]
        grids = [x for x in (a.get(grid), b.get(grid)) if x is not None]
        out[px] = torch.cat(parts) if parts else None
        out[grid] = torch.cat(grids) if grids else None
    return out


class _Loader(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _loader(batches):
    return torch.utils.data.DataLoader(_Loader(batches), batch_size=None, shuffle=False)


class GradCapture(QMoELightningModule):
    """Keeps a copy of the gradients the optimizer will see (after normalisation, before clipping)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _grads_after_one_step(tmp_path, batches, accumulate, **module_kwargs):
    torch.manual_seed(0)
    module = GradCapture(pretrained="embedded", lr=0.0, **module_kwargs)
    trainer = make_trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate)
    trainer.fit(module, train_dataloaders=_loader(batches))
    return module.grads, module


def test_gradient_accumulation_equals_one_big_batch(tmp_path, small_data):
    a, b = _two_micro_batches(make_datamodule(small_data, tmp_path / "cache", max_tokens=128))
    acc, _ = _grads_after_one_step(tmp_path / "acc", [a, b], accumulate=2, aux_loss_coef=0.0)
    big, _ = _grads_after_one_step(tmp_path / "big", [_concat(a, b)], accumulate=1, aux_loss_coef=0.0)
    assert acc.keys() == big.keys() and len(acc) > 10
    for name in acc:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-7, msg=name)
    # and it is NOT the mean of two per-micro-batch means when the token counts differ
    if a["num_label_tokens"] != b["num_label_tokens"]:
        la, _ = _grads_after_one_step(tmp_path / "a", [a], accumulate=1, aux_loss_coef=0.0)
        lb, _ = _grads_after_one_step(tmp_path / "b", [b], accumulate=1, aux_loss_coef=0.0)
        name = "lm_head.weight"
        assert not torch.allclose((la[name] + lb[name]) / 2, acc[name], rtol=1e-3, atol=1e-6)


def test_aux_loss_gradient_matches_documented_objective(tmp_path, small_data):
    a, b = _two_micro_batches(make_datamodule(small_data, tmp_path / "cache", max_tokens=128))
    coef = 0.05
    grads, module = _grads_after_one_step(tmp_path / "acc", [a, b], accumulate=2, aux_loss_coef=coef)
    # reference: plain autograd on the objective sum_i (CE_sum_i + coef * n_i * aux_i) / N, same initial weights
    ref = QMoELightningModule(pretrained="embedded", aux_loss_coef=coef)
    ref.configure_model()
    ref.model.train()
    N = a["num_label_tokens"] + b["num_label_tokens"]
    total = 0.0
    for batch in (a, b):
        out = ref(batch, num_items_in_batch=1, label_logits_only=True, output_router_logits=False)
        total = total + (out.ce_loss + coef * out.num_label_tokens * out.aux_loss) / N
    total.backward()
    for name, p in ref.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert module.last_step.global_targets == N


class LossRecorder(pl.Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_step is not None and not pl_module.step_in_progress:
            self.losses[trainer.global_step] = pl_module.last_step.loss
            if self.stop_at is not None and trainer.global_step >= self.stop_at:
                trainer.should_stop = True  # an interruption right after a checkpoint


def _resume_fit(root, data, cache, max_steps, ckpt_path=None, stop_at=None):
    torch.manual_seed(0)
    module = QMoELightningModule(pretrained="embedded", lr=3e-3, warmup_steps=2, min_lr_ratio=0.1)
    rec = LossRecorder(stop_at)
    trainer = make_trainer(root, max_steps=max_steps, enable_checkpointing=True,
                           callbacks=[RunCheckpoint(every_n_train_steps=1), rec])
    trainer.fit(module, datamodule=make_datamodule(data, cache, max_tokens=128), ckpt_path=ckpt_path)
    return rec.losses, trainer


def test_resume_from_last_continues_the_loss_curve(tmp_path, small_data):
    full, _ = _resume_fit(tmp_path / "full", small_data, tmp_path / "cache", max_steps=6)
    first, _ = _resume_fit(tmp_path / "run", small_data, tmp_path / "cache", max_steps=6, stop_at=3)
    assert sorted(first) == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    second, trainer = _resume_fit(tmp_path / "run", small_data, tmp_path / "cache", max_steps=6, ckpt_path="last")
    assert sorted(second) == [4, 5, 6] and trainer.global_step == 6
    curve = {**first, **second}
    for step in range(1, 7):
        assert curve[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, curve, full)
    assert len(set(round(v, 6) for v in full.values())) == 6  # the curve moves: the comparison is not trivial


def test_freeze_switches_and_activation_checkpointing(tmp_path, small_data):
    module = QMoELightningModule(pretrained="embedded", freeze_vision_tower=True, freeze_router=True,
                                 freeze_embeddings=True, activation_checkpointing=True, lr=1e-2)
    trainer = make_trainer(tmp_path, max_steps=2)
    dm = make_datamodule(small_data, tmp_path / "cache", max_tokens=128)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=dm)
    assert module.model.text_model.gradient_checkpointing
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p.detach())}
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and not (changed & frozen)
    assert any(n.startswith("model.visual.") for n in frozen)
    assert any(n.endswith("mlp.gate.weight") for n in frozen)
    assert any(n.endswith("embed_tokens.weight") for n in frozen)
    assert "lm_head.weight" in changed and any("experts" in n for n in changed)
