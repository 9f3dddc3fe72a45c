"""Aux-loss-free expert load balancing (`model.router_balancing: bias | both`, DeepSeek-V3): a per-expert routing
bias that changes which experts are selected and nothing else, moved after each optimizer step towards equal loads.

- the router: the bias changes the selection but the weights stay the renormalised unbiased probabilities; a zero
  bias (or none) is bitwise the router without it; the bias never gets a gradient and stays fp32 through bf16 casts;
  routing replay (activation checkpointing) records the biased selection;
- the update rule on hand-made counts, and balancing in a loop (a router favouring one expert ends up balanced;
  rate 0 does not: the negative control);
- `bias` leaves the aux term out of the loss (gradient == aux_loss_coef 0, != the default aux_loss run);
- HF I/O: exports write no bias, HF loading stays strict without asking for it; LoRA adapter-only checkpoints keep it;
- through the app (`cli.py fit`): a short bias run moves the bias, logs it, checkpoints it, resumes it
  (`--ckpt_path last`), and its HF export loads in transformers with no missing / unexpected key;
- ep=2 on 2 processes (crashed and resumed from its distributed checkpoint) == 1 process accumulating, with the
  bias identical on both ranks and in both runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_app_common import small_data  # noqa: F401  (fixture)
from test_app_expert_parallel import GRAD_STEPS, _compare, _compare_gradients, _fit, _weights, weight_bound
from tiny_configs import make_config

import cli
from qmoe_lightning.models.moe import RoutingReplay, TopKRouter, balancing_bias_delta

ROOT = Path(__file__).resolve().parents[1]


def _router(seed: int = 0, H: int = 16, E: int = 8, k: int = 2):
    torch.manual_seed(seed)
    router = TopKRouter(H, E, k)
    router.reset_parameters(std=0.3)
    return router, torch.randn(64, H)


def _unbiased_weights(router, x, indices):
    """The weights formula: softmax probabilities (fp32) at the selected experts, renormalised."""
    probs = torch.softmax(x @ router.weight.detach().T, dim=-1, dtype=torch.float32)
    w = probs.gather(-1, indices)
    return w / w.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- router


def test_zero_bias_is_bitwise_the_router_without_bias():
    router, x = _router()
    before = router(x)
    assert router.expert_bias is None and "expert_bias" not in router.state_dict()
    router.enable_balancing_bias()
    assert router.expert_bias.dtype == torch.float32 and not router.expert_bias.any()
    assert "expert_bias" in router.state_dict()
    after = router(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_bias_changes_selection_not_the_weights_formula():
    router, x = _router()
    _, w0, idx0 = router(x)
    router.enable_balancing_bias()
    router.expert_bias[3] = 1.0  # larger than any probability gap: expert 3 is picked by every token
    logits, w, idx = router(x)
    assert (idx == 3).any(-1).all() and not torch.equal(idx, idx0)  # the selection changed
    assert torch.equal(w, _unbiased_weights(router, x, idx))  # weights: unbiased probabilities, renormalised
    # negative control: renormalising the BIASED scores would give other weights
    biased = (torch.softmax(logits, -1) + router.expert_bias).gather(-1, idx)
    assert not torch.allclose(w, biased / biased.sum(-1, keepdim=True), atol=1e-3)
    assert torch.equal(logits, x @ router.weight.detach().T)  # logits (aux loss, statistics) never see the bias


def test_bias_gets_no_gradient_and_stays_fp32():
    router, x = _router()
    router.enable_balancing_bias()
    router.expert_bias.uniform_(-0.1, 0.1)
    logits, w, _ = router(x)
    (w.square().sum() + logits.sum()).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.expert_bias.grad is None and not router.expert_bias.requires_grad
    assert "expert_bias" not in dict(router.named_parameters())
    kept = router.expert_bias.clone()
    router.to(torch.bfloat16)  # Lightning's bf16-true convert_module
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    assert torch.equal(router.expert_bias, kept)


def test_routing_replay_records_the_biased_selection():
    router, x = _router()
    router.enable_balancing_bias()
    router.expert_bias[5] = 1.0
    _, _, plain = router(x)
    router.replay = replay = RoutingReplay()
    cache: list = []
    record, recompute = replay.phases(cache)
    with record:
        _, w1, idx1 = router(x)
    assert torch.equal(idx1, plain) and torch.equal(cache[0], plain)
    router.expert_bias.zero_()  # whatever the bias is at recompute time, the forward's routing is replayed
    with recompute:
        _, w2, idx2 = router(x)
    assert torch.equal(idx2, idx1) and torch.equal(w2, w1)


# ---------------------------------------------------------------------------------------------- update rule


def test_update_rule_on_hand_made_counts():
    counts = torch.tensor([[10, 0, 5, 5], [3, 3, 3, 3], [0, 0, 0, 0]])
    delta = balancing_bias_delta(counts, 1e-3)
    # layer 0: mean 5; overloaded expert 0 down, starved expert 1 up, experts at the mean unchanged
    assert delta[0].tolist() == [-1e-3, 1e-3, 0.0, 0.0]
    assert delta[1:].abs().sum() == 0  # balanced layer, and a layer that routed nothing: no change


@pytest.mark.parametrize("rate", [1e-2, 0.0], ids=["rate", "negative_control_rate0"])
def test_bias_balances_a_skewed_router(rate):
    router, x = _router(seed=1)
    u = torch.randn(x.shape[1])
    u = u / u.norm()
    x = x + 2 * u  # a direction every token shares...
    with torch.no_grad():
        router.weight[0] += 1.2 * u  # ...which expert 0 prefers: most tokens pick it
    router.enable_balancing_bias()
    E = router.weight.shape[0]

    @torch.no_grad()
    def cv():
        counts = torch.bincount(router(x)[2].reshape(-1), minlength=E).double()
        return (counts.std(unbiased=False) / counts.mean()).item(), counts

    start, _ = cv()
    for _ in range(100):
        _, counts = cv()
        router.expert_bias += balancing_bias_delta(counts, rate).float()
    end, _ = cv()
    if rate:
        assert start > 0.7 and end < 0.4 * start, (start, end)  # seen: 0.89 -> 0.23
    else:
        assert end == start


# ---------------------------------------------------------------------------------------------- loss, HF I/O, LoRA


def test_bias_mode_leaves_the_aux_term_out_of_the_loss(tmp_path, small_data):
    from test_app_common import make_datamodule
    from test_app_training import _two_micro_batches

    from qmoe_lightning.lightning_module import QMoELightningModule

    batch, _ = _two_micro_batches(make_datamodule(small_data, tmp_path / "cache", max_tokens=128))
    coefs = {mode: QMoELightningModule(pretrained="embedded", aux_loss_coef=0.5, router_balancing=mode).aux_loss_coef
             for mode in ("aux_loss", "bias", "both")}
    assert coefs == {"aux_loss": 0.5, "bias": 0.0, "both": 0.5}
    for mode in ("aux_loss", "bias"):
        module = QMoELightningModule(pretrained="embedded", aux_loss_coef=0.5, router_balancing=mode)
        module.configure_model()
        assert (module.model.routers()[0].expert_bias is not None) == (mode == "bias")
        with torch.no_grad():
            loss = module.training_step(batch, 0)
        win = module._window  # what the micro-batch's forward gave (detached)
        ce, n, aux = win.ce_sum, win.n_targets, win.aux_values[0]
        if mode == "aux_loss":  # negative control: the aux term is in this loss
            assert not torch.equal(loss, ce) and torch.equal(loss, ce + 0.5 * n * aux)
        else:  # bias: CE only, the aux loss still computed (and logged)
            assert torch.equal(loss, ce) and aux > 0
            # the window's picks for the update: top-k per real token in every MoE layer
            k = module.model.text_config.num_experts_per_tok
            assert win.expert_counts.shape == (len(module.model.routers()), 8)
            assert (win.expert_counts.sum(-1) == k * win.tokens).all()


def _native_model(with_bias: bool):
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config())
    if with_bias:
        for i in model.text_model.moe_layers:
            model.text_model.layers[i].mlp.gate.enable_balancing_bias()
            model.text_model.layers[i].mlp.gate.expert_bias.uniform_(-0.1, 0.1)
    return model


def test_hf_export_has_no_bias_and_hf_loading_does_not_ask_for_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from qmoe_lightning.models import checkpoint as ckpt

    model = _native_model(with_bias=True)
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("expert_bias")}
    assert len(biases) == len(model.text_model.moe_layers)
    model.save_pretrained(tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index and not any("bias" in k for k in index if ".mlp.gate." in k)
    # strict loading into a model that has the bias: no complaint about it, the bias is left alone
    target = _native_model(with_bias=True)
    kept = {k: v.clone() for k, v in target.state_dict().items() if k.endswith("expert_bias")}
    ckpt.load_hf_weights(target, tmp_path / "hf")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in kept.items())
    assert torch.equal(target.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    # ...and still strict: a checkpoint carrying a bias tensor (or missing a weight) is refused
    files = ckpt.safetensors_files(tmp_path / "hf")
    tensors = load_file(str(files[0]))
    save_file({**tensors, next(iter(biases)): torch.zeros(8)}, str(files[0]))  # HF name == native name here
    with pytest.raises(ValueError, match="unexpected \\(1\\).*expert_bias"):
        ckpt.load_hf_weights(target, tmp_path / "hf")


def test_lora_adapter_only_checkpoint_keeps_the_bias():
    from qmoe_lightning.lora import LoraConfig, apply_lora, check_adapter_state_dict, keep_adapters_only

    model = _native_model(with_bias=True)
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=["attention"]))
    sd = keep_adapters_only(model.state_dict())
    bias_keys = [k for k in sd if k.endswith("expert_bias")]
    assert len(bias_keys) == len(model.text_model.moe_layers) and any("lora_A" in k for k in sd)
    assert not any(k.endswith("mlp.gate.weight") for k in sd)  # the (frozen) router weights are not kept
    check_adapter_state_dict(sd, model)
    with pytest.raises(ValueError, match="missing"):
        check_adapter_state_dict({k: v for k, v in sd.items() if k not in bias_keys}, model)
    plain = _native_model(with_bias=False)
    apply_lora(plain, LoraConfig(rank=2, alpha=4, targets=["attention"]))
    with pytest.raises(ValueError, match="unexpected"):  # a bias checkpoint into an aux_loss model
        check_adapter_state_dict(sd, plain)


# ---------------------------------------------------------------------------------------------- through the app


@pytest.fixture
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


def _biases(module) -> torch.Tensor:
    return torch.stack([r.expert_bias.detach().clone() for r in module.model.routers()])


def test_app_bias_run_moves_checkpoints_resumes_and_exports(tmp_path, small_data, _clean_argv):
    from transformers import AutoModelForImageTextToText

    rate = 1e-2
    root = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.default_root_dir", str(root),
              "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
              "--data.train_path", str(small_data), "--data.val_path", str(small_data), "--data.max_tokens", "128",
              "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
              "--model.router_balancing", "bias", "--model.balancing_bias_rate", str(rate)]
    app = cli.main(["fit", *common, "--trainer.max_steps", "3"])
    b3 = _biases(app.model)
    assert b3.abs().max() > 0.5 * rate  # moved
    assert torch.allclose(b3 / rate, (b3 / rate).round(), atol=1e-4)  # in whole steps of the rate
    assert app.trainer.callback_metrics["experts/bias_abs_max"] == pytest.approx(b3.abs().max().item())
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = torch.stack([v for k, v in ckpt["state_dict"].items() if k.endswith("mlp.gate.expert_bias")])
    assert torch.equal(saved, b3)

    export = root / "hf_export"
    assert "expert_bias" not in (export / "model.safetensors.index.json").read_text()
    hf, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # the resume restores the bias (max_steps already reached: restored, nothing trained; the ep=2 test below
    # resumes and trains on); a bias left out of the checkpoint or not restored would be zero here
    resumed = cli.main(["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3 and torch.equal(_biases(resumed.model), b3)


@pytest.mark.multiprocess
def test_ep2_bias_crash_resume_equals_one_process_accumulating(tmp_path):
    """EP=2 on 2 processes (crashed after step 3, resumed from its distributed checkpoint) vs 1 process
    accumulating 2 micro-batches, balancing by bias: same gradients, weights and biases (both ranks alike)."""
    bias = ["--model.router_balancing", "bias", "--model.balancing_bias_rate", "1e-2",
            "--trainer.callbacks+=ep_test_callbacks.DumpBalancingBias"]
    ckpt = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
            "--trainer.callbacks.every_n_train_steps", "2"]
    ep, single = tmp_path / "ep", tmp_path / "single"
    proc = _fit(ep, *bias, *ckpt, "--trainer.callbacks+=ep_test_callbacks.CrashAtStep",
                "--trainer.callbacks.step", "3", check=False)
    assert proc.returncode != 0 and "simulated crash at step 3" in proc.stderr
    saved = _dcp_keys(ep / "checkpoints" / "last.ckpt")
    assert sum(k.endswith("mlp.gate.expert_bias") for k in saved) == 4, sorted(saved)[:5]
    _fit(ep, *bias, *ckpt, "--ckpt_path", "last")
    _fit(single, *bias, "--trainer.accumulate_grad_batches", "2", devices=1)

    grads = _compare_gradients(ep, single)  # steps 0..GRAD_STEPS-1, from the crashed run
    worst = _compare(_weights(ep), _weights(single), weight_bound(4e-3))
    rank0, rank1, one = (torch.load(p) for p in (ep / "bias_rank0.pt", ep / "bias_rank1.pt", single / "bias_rank0.pt"))
    assert rank0.abs().max() > 5e-3  # moved
    assert torch.equal(rank0, rank1), "the replicated bias differs between ranks"
    assert torch.equal(rank0, one), (rank0 - one).abs().max()
    print(f"bias ep=2 (resumed) vs 1 process x accumulate 2: gradients {grads:.2e} (first {GRAD_STEPS} steps), "
          f"weights {worst:.2e}, bias bitwise equal (max |b| {rank0.abs().max():.3f})")


def _dcp_keys(path: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
