"""Multi-token prediction (Qwen3.5-MoE `mtp.*`), fp32 on CPU:

- the native module's per-depth logits == a test-only reference written from vLLM's `Qwen3_5MultiTokenPredictor`
  (vllm/model_executor/models/qwen3_5_mtp.py: `cat([pre_fc_norm_embedding(embed(tok[t+1])),
  pre_fc_norm_hidden(h_t)])`, `fc`, one full-attention decoder layer at the main model's positions, `norm`, the
  shared lm_head; GemmaRMSNorm = zero-centred) built from transformers' own Qwen3.5 decoder layer, rotary and norm
  classes loaded with the checkpoint's `mtp.*` tensors, for both expert layouts (per expert as Qwen3.5-35B-A3B
  stores them, fused as Qwen3.6);
- a packed row's MTP loss == the sum of its documents' stand-alone MTP losses; negative control: with document
  boundaries ignored the row leaks;
- round trip: `mtp.*` loaded, changed, written back under the same names and layout; transformers still loads the
  export (it ignores `mtp.*`); a checkpoint without `mtp.*` is refused with the fix named, or left to a random init.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_configs import make_config, make_hf_model, pack, vision_doc

from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration as Native
from qmoe_lightning.models import lm_loss

TOL = 1e-5


def write_mtp_checkpoint(path, config, layout: str, num_layers: int = 1, seed: int = 3) -> dict[str, torch.Tensor]:
    """Add `mtp.*` tensors (real names, `layout` experts) to the transformers checkpoint in `path`."""
    torch.manual_seed(seed)
    donor = Native.from_config(config, mtp_layers=num_layers)
    with torch.no_grad():
        for name, p in donor.mtp.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = donor.state_dict_adapter()
    adapter.mtp_expert_layout = layout
    mtp = {}
    for k, v in donor.state_dict().items():
        if k.startswith("mtp."):
            mtp.update(dict(adapter.convert_single_tensor_to_hf(k, v)))
    save_file(mtp, str(path / "mtp.safetensors"))
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
    else:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    index_file.write_text(json.dumps(index))
    return mtp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """layout -> (transformers model, directory with mtp.* in that layout)."""
    hf = make_hf_model(make_config("base"), seed=21)
    out = {}
    for layout in ("per_expert", "fused"):
        path = tmp_path_factory.mktemp(f"mtp_{layout}")
        hf.save_pretrained(path)
        write_mtp_checkpoint(path, hf.config, layout)
        out[layout] = (hf, path)
    return out


def reference_mtp_logits(hf, path, ids: torch.Tensor) -> torch.Tensor:
    """vLLM's MTP forward (depth 0) from transformers' Qwen3.5 classes and the checkpoint's own tensors."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer, Qwen3_5MoeRMSNorm

    tensors = load_file(str(path / "mtp.safetensors"))
    text = copy.deepcopy(hf.config.text_config)
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    layer = Qwen3_5MoeDecoderLayer(text, 0).float().eval()
    layer.config = text
    state = {k[len("mtp.layers.0."):]: v for k, v in tensors.items() if k.startswith("mtp.layers.0.")}
    E, I = text.num_experts, text.moe_intermediate_size
    if "mlp.experts.0.gate_proj.weight" in state:  # per expert -> transformers' fused in-memory layout
        state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([state.pop(f"mlp.experts.{e}.gate_proj.weight"),
                                                                    state.pop(f"mlp.experts.{e}.up_proj.weight")])
                                                         for e in range(E)])
        state["mlp.experts.down_proj"] = torch.stack([state.pop(f"mlp.experts.{e}.down_proj.weight")
                                                      for e in range(E)])
    assert state["mlp.experts.gate_up_proj"].shape == (E, 2 * I, text.hidden_size)
    layer.load_state_dict(state, strict=True)
    layer.mlp.experts.config = text
    text._experts_implementation = "eager"

    def norm(name):
        n = Qwen3_5MoeRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        n.weight.data.copy_(tensors[f"mtp.{name}.weight"])
        return n

    lm = hf.model.language_model
    with torch.no_grad():
        h = lm(input_ids=ids).last_hidden_state  # the main model's final hidden state, after its norm
        emb = lm.embed_tokens(ids)
        nxt = torch.cat([emb[:, 1:], torch.zeros_like(emb[:, :1])], 1)  # embed(tok[t + 1]); nothing past the end
        x = torch.cat([norm("pre_fc_norm_embedding")(nxt), norm("pre_fc_norm_hidden")(h)], -1) @ tensors[
            "mtp.fc.weight"].t()
        pos = torch.arange(ids.shape[1])[None]  # the main model's positions of t
        rope = lm.rotary_emb(x, pos[None].expand(3, -1, -1))
        y = layer(x, position_embeddings=rope, attention_mask=None, position_ids=pos)
        return hf.lm_head(norm("norm")(y))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_native_mtp_logits_equal_the_inference_engine_reference(checkpoints, layout):
    hf, path = checkpoints[layout]
    model = Native.from_pretrained(path, mtp_layers=1).eval()
    assert model.checkpoint_source.report.mtp_expert_layout == layout
    ids = torch.randint(0, 400, (1, 37), generator=torch.Generator().manual_seed(4))
    ref = reference_mtp_logits(hf, path, ids)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        ours = model.lm_head(out.mtp.hidden_states[0])
    # the last position has no next token: vLLM would feed the sampled one there, nothing is trained on it
    assert (ours[:, :-1] - ref[:, :-1]).abs().max() <= TOL


def test_reference_is_decisive_embedding_of_t_instead_of_t_plus_1_differs(checkpoints, monkeypatch):
    """Negative control: the same module fed the embedding of t (not t + 1) is far from the reference."""
    import qmoe_lightning.models.causal_lm as causal_lm

    hf, path = checkpoints["fused"]
    model = Native.from_pretrained(path, mtp_layers=1).eval()
    ids = torch.randint(0, 400, (1, 29), generator=torch.Generator().manual_seed(5))
    ref = reference_mtp_logits(hf, path, ids)
    real = causal_lm.shifted_embeddings
    monkeypatch.setattr(causal_lm, "shifted_embeddings", lambda e, info, offset: real(e, info, offset - 1))
    with torch.no_grad():
        wrong = model.lm_head(model(input_ids=ids, labels=ids).mtp.hidden_states[0])
    assert (wrong[:, :-1] - ref[:, :-1]).abs().max() > 1e-2


DOCS = [[5, ("image", (1, 4, 6)), 30], [41], [2, ("video", (2, 4, 4)), 9], [3, ("image", (1, 2, 2)), 17]]


@pytest.mark.parametrize("depths", [1, 2])
def test_packed_mtp_loss_is_the_sum_of_the_documents_alone(checkpoints, depths, monkeypatch):
    hf, path = checkpoints["per_expert"]
    torch.manual_seed(0)
    model = Native.from_pretrained(path, mtp_layers=1).eval() if depths == 1 else \
        Native.from_config(hf.config, mtp_layers=depths).eval()
    docs = [vision_doc(p, seed=70 + i) for i, p in enumerate(DOCS)]
    row = pack(docs)
    labels = row["input_ids"].clone()
    labels[row["mm_token_type_ids"] != 0] = -100
    with torch.no_grad():
        packed = model(**row, labels=labels, num_items_in_batch=1)
        cu = row["cu_seqlens"].tolist()
        alone_sum, alone_n = 0.0, 0
        for i, doc in enumerate(docs):
            out = model(**doc, labels=labels[:, cu[i]: cu[i + 1]], num_items_in_batch=1)
            alone_sum = alone_sum + out.mtp.ce
            alone_n = alone_n + out.mtp.num_targets
        assert torch.equal(packed.mtp.num_targets, alone_n)
        assert (packed.mtp.ce - alone_sum).abs().max() <= TOL * alone_sum.abs().max()
        # negative control: targets taken across document boundaries (what NeMo's packed VLM path does)
        import qmoe_lightning.models.causal_lm as causal_lm

        monkeypatch.setattr(causal_lm, "future_token_targets",
                            lambda lab, cu_, off: lm_loss.future_token_targets(lab, None, off))
        leaked = model(**row, labels=labels, num_items_in_batch=1)
    assert int(leaked.mtp.num_targets.sum()) > int(alone_n.sum())
    assert (leaked.mtp.ce - alone_sum).abs().max() > 1e-2


def test_mtp_round_trip_keeps_names_and_layout_and_transformers_still_loads(checkpoints, tmp_path):
    from transformers import Qwen3_5MoeForConditionalGeneration as HF

    for layout in ("per_expert", "fused"):
        _, path = checkpoints[layout]
        model = Native.from_pretrained(path, mtp_layers=1)
        with torch.no_grad():
            for p in model.mtp.parameters():
                p.add_(0.01)  # "trained"
        out = model.save_pretrained(tmp_path / layout)
        written = {}
        for f in out.glob("*.safetensors"):
            written.update(load_file(f))
        source = load_file(str(path / "mtp.safetensors"))
        mtp_written = {k: v for k, v in written.items() if k.startswith("mtp.")}
        assert set(mtp_written) == set(source), layout  # same names, same layout
        assert all(torch.allclose(mtp_written[k], source[k] + 0.01) for k in source)
        again = Native.from_pretrained(out, mtp_layers=1)
        for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), n
        hf, info = HF.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"]  # mtp.* ignored by transformers, nothing else unexpected
        assert not [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
        # without an MTP module the tensors are copied through unchanged
        plain = Native.from_pretrained(out)
        assert plain.mtp is None and set(plain.checkpoint_source.passthrough) == set(source)


def test_checkpoint_without_mtp_is_refused_or_random_init_on_request(tmp_path):
    from qmoe_lightning.models.checkpoint import load_hf_weights

    hf = make_hf_model(make_config("base"), seed=2)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no multi-token prediction tensors \(mtp\.\*\).*model\.mtp\.init: random"):
        Native.from_pretrained(tmp_path, mtp_layers=1)
    model = Native._empty(hf.config, None, "cpu", mtp_layers=1)
    report = load_hf_weights(model, tmp_path, mtp_missing_ok=True)
    assert report.mtp_random_init


def test_random_init_on_request_keeps_the_checkpoint_and_fills_the_mtp_module(tmp_path):
    from qmoe_lightning.build import build_model

    hf = make_hf_model(make_config("base"), seed=2)
    hf.save_pretrained(tmp_path)
    built = build_model(Native, hf.config, checkpoint=tmp_path, model_kwargs={"mtp_layers": 1},
                        mtp_random_init=True, init_seed=5)
    model = built.model
    assert built.source.report.mtp_random_init
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)  # the checkpoint is loaded as it is
    fc = model.mtp.fc.weight
    assert torch.isfinite(fc).all() and 0.01 < fc.std() < 0.03  # the model's init (std 0.02), not garbage
    again = build_model(Native, hf.config, checkpoint=tmp_path, model_kwargs={"mtp_layers": 1},
                        mtp_random_init=True, init_seed=5).model
    assert torch.equal(again.mtp.fc.weight, fc)  # seeded


def test_activation_checkpointing_and_bf16_with_mtp(checkpoints):
    _, path = checkpoints["fused"]
    batch = vision_doc([4, ("image", (1, 4, 4)), 23], seed=8)
    grads = []
    for checkpointing in (False, True):
        model = Native.from_pretrained(path, mtp_layers=1).train()
        for block in list(model.text_model.layers) + list(model.mtp.layers):
            block.checkpointing = checkpointing
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("mtp.")})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().max() > 0 for g in grads[0].values())
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    low = Native.from_pretrained(path, mtp_layers=1, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = low(**batch, labels=batch["input_ids"])
    assert out.mtp.hidden_states[0].dtype == torch.bfloat16 and torch.isfinite(out.mtp.ce).all()


def test_qwen3_vl_moe_refuses_mtp_with_a_reason():
    from qmoe_lightning.lightning_module import QMoELightningModule

    module = QMoELightningModule(pretrained="embedded:qwen3_vl_moe", mtp={"enabled": True})
    with pytest.raises(ValueError, match="Qwen3-VL-MoE has no multi-token prediction module"):
        module.configure_model()


def test_padded_rows_left_or_right_give_each_row_its_alone_mtp_loss(checkpoints):
    _, path = checkpoints["fused"]
    model = Native.from_pretrained(path, mtp_layers=1).eval()
    g = torch.Generator().manual_seed(9)
    rows = [torch.randint(0, 400, (1, n), generator=g) for n in (17, 12)]
    with torch.no_grad():
        alone = [model(input_ids=r, labels=r, num_items_in_batch=1).mtp for r in rows]
        for left in (False, True):
            ids = torch.zeros(2, 17, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, r in enumerate(rows):
                span = slice(17 - r.shape[1], 17) if left else slice(0, r.shape[1])
                ids[i, span], mask[i, span], labels[i, span] = r[0], 1, r[0]
            out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=1).mtp
            assert int(out.num_targets) == sum(int(a.num_targets) for a in alone), left
            assert torch.allclose(out.ce, sum(a.ce for a in alone), rtol=1e-5), left


def test_more_mtp_layers_than_the_checkpoint_has_is_named_and_export_states_the_depth(checkpoints, tmp_path):
    _, path = checkpoints["fused"]
    with pytest.raises(ValueError, match="fewer multi-token prediction layers.*mtp.num_layers"):
        Native.from_pretrained(path, mtp_layers=2)
    out = Native.from_pretrained(path, mtp_layers=1).save_pretrained(tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1


def test_lora_with_a_random_mtp_module_is_refused(tmp_path):
    from qmoe_lightning.build import build_model

    hf = make_hf_model(make_config("base"), seed=2)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mtp.init: random with LoRA"):
        build_model(Native, hf.config, checkpoint=tmp_path, model_kwargs={"mtp_layers": 1}, mtp_random_init=True,
                    lora={"rank": 2, "alpha": 4})
