"""ExpertLoadStats and MoEAuxLossLogger against figures computed independently from the routers' own outputs.

Forward hooks on every router (`mlp.gate`, returns logits, weights, top-k indices) record what each layer routed
during training; counts, load ratios, dead experts, entropies and per-layer aux losses are recomputed from those
records with plain torch and compared with what the callbacks logged. The heatmap must be a valid PNG of the
expected size.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from test_app_common import make_datamodule, make_trainer, small_data  # noqa: F401  (fixture)

from callbacks import ExpertLoadStats, MoEAuxLossLogger
from callbacks.heatmap import heatmap_title, load_heatmap_figure, relative_load, save_figure, summary_figure
from qmoe_lightning.lightning_module import QMoELightningModule


class RouterTap(pl.Callback):
    """Records every router's (logits, top-k indices) in training forwards, grouped by optimizer step."""

    def __init__(self):
        self.records: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per micro-batch: per layer
        self._current = None
        self.logged: dict[int, dict[str, float]] = {}

    def on_fit_start(self, trainer, pl_module):
        for layer in pl_module.model.text_model.layers:
            layer.mlp.gate.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if module.training and self._current is not None:
            logits, _weights, indices = output
            real = self._real  # tail padding (attention_mask 0) is not routed work: leave it out
            self._current.append((logits.detach()[real].clone(), indices.detach()[real].clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._current = []
        mask = batch.get("attention_mask")
        self._real = slice(None) if mask is None else mask.reshape(-1).bool()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append(self._current)
        self._current = None
        self.logged[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _independent(records, num_experts):
    L = len(records[0])
    counts = torch.zeros(L, num_experts, dtype=torch.long)
    entropy_sum = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    for mb in records:
        tokens += mb[0][0].shape[0]
        for layer, (logits, idx) in enumerate(mb):
            counts[layer] += torch.bincount(idx.reshape(-1), minlength=num_experts)
            p = torch.softmax(logits.double(), -1)
            entropy_sum[layer] += -(p * p.log()).sum()
    return counts, entropy_sum / tokens


def test_expert_load_stats_match_router_outputs(tmp_path, small_data):
    stats = ExpertLoadStats(window_steps=3, heatmap_every_n_steps=3, per_layer=True)
    tap = RouterTap()
    module = QMoELightningModule(pretrained="embedded", lr=1e-2)
    dm = make_datamodule(small_data, tmp_path / "cache", max_tokens=128)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[stats, tap], accumulate_grad_batches=1)
    trainer.fit(module, datamodule=dm)

    E = module.model.text_config.num_experts
    k = module.model.text_config.num_experts_per_tok
    counts, entropy = _independent(tap.records, E)
    assert len(tap.records) == 3
    assert torch.equal(stats.last_counts, counts)
    tokens = sum(mb[0][0].shape[0] for mb in tap.records)
    assert int(counts.sum()) == tokens * k * counts.shape[0]  # every token picked k experts in every layer

    c = counts.double()
    s = stats.last_summary
    ratio = c.max(1).values / c.mean(1)
    assert s["experts/max_mean_ratio"] == pytest.approx(float(ratio.mean()), rel=1e-9)
    assert s["experts/max_mean_ratio_worst"] == pytest.approx(float(ratio.max()), rel=1e-9)
    assert s["experts/cv"] == pytest.approx(float((c.std(1, unbiased=False) / c.mean(1)).mean()), rel=1e-9)
    assert s["experts/dead"] == float((counts == 0).sum())
    assert s["experts/router_entropy"] == pytest.approx(float(entropy.mean()), rel=1e-6)
    assert s["experts/router_entropy_norm"] == pytest.approx(float(entropy.mean()) / math.log(E), rel=1e-6)
    assert s["experts/window_tokens"] == tokens
    assert s["experts/layer_0/max_mean_ratio"] == pytest.approx(float(ratio[0]), rel=1e-9)
    assert trainer.callback_metrics["experts/cv"].item() == pytest.approx(s["experts/cv"], rel=1e-6)

    # the heatmap: a valid PNG whose title (also in its metadata) carries the step and the window's statistics
    assert len(stats.heatmaps) == 1 and stats.heatmaps[0].parent == tmp_path / "expert_load"
    raw = stats.heatmaps[0].read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(stats.heatmaps[0]) as im:
        im.verify()
    with Image.open(stats.heatmaps[0]) as im:
        assert im.text["Title"] == heatmap_title(counts.numpy(), 3)
    assert f"dead {int((counts == 0).sum())}" in heatmap_title(counts.numpy(), 3)


def _render(fig_title, tmp_path, name):
    path, rgb = save_figure(*fig_title, tmp_path / name)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size, im.text["Title"], np.asarray(im.convert("RGB")), rgb


@pytest.mark.parametrize("L,E", [(4, 8), (40, 256)])  # the tiny model and the real 35B-A3B / 397B shape
def test_heatmap_is_labelled_and_readable_at_real_sizes(tmp_path, L, E):
    rng = np.random.default_rng(0)
    counts = rng.poisson(50, size=(L, E))
    counts[1, 3] = counts[L - 1, E - 1] = 0  # two dead experts
    counts[0, 0] = 50 * 6  # a hot one, above the colour scale
    size, title, img, rgb = _render(load_heatmap_figure(counts, step=1200), tmp_path, f"h{E}.png")
    assert title.startswith("expert load, step 1200\nCV ") and title.endswith("dead 2")
    assert size[0] >= 500 and size[1] >= 250 and size[0] <= 2700  # readable, not a 96 x 48 thumbnail
    assert E < 100 or size[0] >= 2000  # 256 experts get a wide figure
    assert rgb.shape == (size[1], size[0], 3)  # the array TensorBoard gets is the same picture
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.sum() > 20  # the dead experts are crossed out


def test_relative_load_scales_by_uniform_share():
    rel = relative_load(np.array([[10, 10, 10, 10], [40, 0, 0, 0], [0, 0, 0, 0]]))
    assert rel.tolist() == [[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]


def test_summary_figure(tmp_path):
    history = {"train/loss": [(s, 6.0 / s) for s in range(1, 50)], "val/loss": [(25, 0.4), (49, 0.3)],
               "moe/aux_loss": [(s, 1.0 + 0.01 * s) for s in range(1, 50)], "experts/cv": [(10, 0.5), (20, 0.4)]}
    size, title, img, _ = _render(summary_figure(history, "run summary: 49 optimizer steps"), tmp_path, "s.png")
    assert title == "run summary: 49 optimizer steps" and size == (1000, 650)
    assert img.std() > 10  # not blank


def test_aux_loss_logger_per_layer_matches_router_outputs(tmp_path, small_data):
    tap = RouterTap()
    module = QMoELightningModule(pretrained="embedded", lr=1e-2)
    dm = make_datamodule(small_data, tmp_path / "cache", max_tokens=128)
    trainer = make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[MoEAuxLossLogger(), tap])
    trainer.fit(module, datamodule=dm)
    E = module.model.text_config.num_experts
    last_step = tap.records[-2:]  # the two micro-batches of step 2
    per_layer, totals = [], []
    for mb in last_step:
        layers = []
        for logits, idx in mb:
            n = logits.shape[0]
            f = torch.bincount(idx.reshape(-1), minlength=E).double() / n
            P = torch.softmax(logits.double(), -1).mean(0)
            layers.append(E * (f * P).sum())
        per_layer.append(torch.stack(layers))
        # transformers' pooled total over layers for the same micro-batch
        f_all = sum(torch.bincount(idx.reshape(-1), minlength=E).double() for _, idx in mb) / (len(mb) * n)
        P_all = sum(torch.softmax(lg.double(), -1).sum(0) for lg, _ in mb) / (len(mb) * n)
        totals.append(E * (f_all * P_all).sum())
    expected_layers = torch.stack(per_layer).mean(0)
    logged = tap.logged[2]
    for layer, value in enumerate(expected_layers.tolist()):
        assert logged[f"moe/aux_loss_layer_{layer}"] == pytest.approx(value, rel=1e-5), layer
    assert logged["moe/aux_loss_layer_max"] == pytest.approx(float(expected_layers.max()), rel=1e-5)
    assert logged["moe/aux_loss"] == pytest.approx(float(torch.stack(totals).mean()), rel=1e-5)
    assert logged["train/aux_loss"] == pytest.approx(logged["moe/aux_loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["MoEAuxLossLogger", "ExpertLoadStats", "HFExport", "LoraExport", "RunCheckpoint"])
def test_callbacks_refuse_another_module_at_setup_naming_themselves(tmp_path, name):
    """They read a QMoELightningModule's typed state: on another module they stop at setup, not mid-run."""
    import lightning.pytorch as pl

    import callbacks

    class Other(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[getattr(callbacks, name)()], enable_checkpointing=name == "RunCheckpoint")
    with pytest.raises(TypeError, match=f"{name} reads the state of a QMoELightningModule.*Other"):
        trainer.fit(Other(), torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2))
