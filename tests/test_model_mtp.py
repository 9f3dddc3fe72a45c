"""Multi-token prediction (`mtp.*`) of every family whose checkpoints carry one (the registry's `supports_mtp`:
Qwen3.5-MoE and Qwen3-Next; ids name the family), fp32 on CPU:

- the native module's per-depth logits == a test-only reference written from vLLM's predictors
  (vllm/model_executor/models/qwen3_5_mtp.py `Qwen3_5MultiTokenPredictor`, qwen3_next_mtp.py
  `Qwen3NextMultiTokenPredictor`: `cat([pre_fc_norm_embedding(embed(tok[t+1])), pre_fc_norm_hidden(h_t)])`, `fc`,
  one full-attention MoE decoder layer at the main model's positions under a causal mask, `norm`, the shared
  lm_head; GemmaRMSNorm = zero-centred) built from transformers' own decoder layer, rotary and norm classes of the
  family (`MtpReference`) loaded with the checkpoint's `mtp.*` tensors, for both expert layouts (per expert as
  Qwen3.5-35B-A3B and Qwen3-Next-80B store them, fused in transformers' layout as Qwen3.6);
- a packed row's MTP loss == the sum of its documents' stand-alone MTP losses (text, image and video documents; text
  documents for a text-only family); negative control: with document boundaries ignored the row leaks;
- round trip: `mtp.*` loaded, changed, written back under the same names and in the layout that was read;
  transformers still loads the export (it ignores `mtp.*`); a checkpoint without `mtp.*` is refused with the fix
  named, or left to a random init;
- activation checkpointing and bf16, padded rows, more MTP layers than the checkpoint has, LoRA with a random MTP
  module. Qwen3-VL-MoE (no MTP module) refuses `mtp.enabled`.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from families import each_family
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_configs import pack, per_expert_layout, text_doc, vision_doc

from qmoe_lightning.models import lm_loss, registry

TOL = 1e-5
LAYOUTS = ("per_expert", "fused")


@dataclass(frozen=True)
class MtpReference:
    """What the reference MTP forward of a family takes from transformers (its modeling module's classes)."""

    layer_class: str  # transformers' decoder layer (the MTP layer is one, full attention and MoE)
    norm_class: str  # transformers' RMSNorm of the family (zero-centred in both)
    decoder: Callable  # transformers' model -> its text decoder (embed_tokens, rotary_emb, final norm)
    mrope: bool  # the decoder's rotary takes the three mRoPE axes (3, B, T) rather than plain (B, T) positions


REFERENCES = {
    "qwen3_5_moe": MtpReference("Qwen3_5MoeDecoderLayer", "Qwen3_5MoeRMSNorm", lambda hf: hf.model.language_model,
                                mrope=True),
    "qwen3_next": MtpReference("Qwen3NextDecoderLayer", "Qwen3NextRMSNorm", lambda hf: hf.model, mrope=False),
}
MTP_FAMILIES = each_family(lambda f: f.registered.supports_mtp)

# packed documents: text, images and videos for a family with vision, text of varied lengths (one of a single token,
# which has no MTP target) for a text-only one
VISION_DOCS = [[5, ("image", (1, 4, 6)), 30], [41], [2, ("video", (2, 4, 4)), 9], [3, ("image", (1, 2, 2)), 17]]
TEXT_DOCS = [37, 1, 50, 12]


def documents(family) -> list[dict]:
    if family.has_vision:
        return [vision_doc(p, seed=70 + i) for i, p in enumerate(VISION_DOCS)]
    return [text_doc(n, seed=70 + i) for i, n in enumerate(TEXT_DOCS)]


def one_document(family) -> dict:
    return vision_doc([4, ("image", (1, 4, 4)), 23], seed=8) if family.has_vision else text_doc(31, seed=8)


def test_every_family_with_mtp_has_a_reference():
    """A family registered with `supports_mtp` runs every test here: it needs its reference classes."""
    with_mtp = {f.model_type for f in registry.FAMILIES.values() if f.supports_mtp}
    assert with_mtp == set(REFERENCES) == {p.values[0].model_type for p in MTP_FAMILIES}


def write_mtp_checkpoint(family, path, config, layout: str, num_layers: int = 1,
                         seed: int = 3) -> dict[str, torch.Tensor]:
    """Add `mtp.*` tensors (real names; experts `layout`: one tensor per expert and projection, or fused in
    transformers' in-memory layout (E, 2I, H) / (E, H, I)) to the transformers checkpoint in `path`."""
    torch.manual_seed(seed)
    donor = family.native.from_config(config, mtp_layers=num_layers)
    with torch.no_grad():
        for name, p in donor.mtp.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = donor.state_dict_adapter()
    fused = {}
    for k, v in donor.state_dict().items():
        if k.startswith("mtp."):
            fused.update(adapter.convert_single_tensor_to_hf(k, v, in_memory=True))
    # experts as transformers holds them, written apart from the adapter's write layout (the round trip tests that)
    tensors = per_expert_layout(fused) if layout == "per_expert" else fused
    mtp = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}  # own, contiguous storage
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
    """(family, layout) -> (transformers model, directory with mtp.* in that layout), each built on first use."""
    models, paths = {}, {}

    def get(family, layout):
        if family.model_type not in models:
            models[family.model_type] = family.make_hf_model(family.make_config("base"), seed=family.seed + 21)
        hf = models[family.model_type]
        if (family.model_type, layout) not in paths:
            path = tmp_path_factory.mktemp(f"{family}_mtp_{layout}")
            hf.save_pretrained(path)
            write_mtp_checkpoint(family, path, hf.config, layout)
            paths[family.model_type, layout] = path
        return hf, paths[family.model_type, layout]

    return get


def reference_mtp_logits(family, hf, path, ids: torch.Tensor) -> torch.Tensor:
    """vLLM's MTP forward (depth 0) from transformers' classes of the family and the checkpoint's own tensors."""
    spec = REFERENCES[family.model_type]
    modeling = importlib.import_module(f"transformers.models.{family.model_type}.modeling_{family.model_type}")
    tensors = load_file(str(path / "mtp.safetensors"))
    text = copy.deepcopy(hf.config.get_text_config())  # a text-only config is its own text config
    # the MTP layer is full attention and MoE whatever the main decoder's rules say of its layer 0
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    if hasattr(text, "mlp_only_layers"):
        text.mlp_only_layers, text.decoder_sparse_step = [], 1
    text._attn_implementation = "eager"  # plain softmax(QK^T / sqrt(d) + mask) V
    text._experts_implementation = "eager"  # transformers' per-expert loop
    layer = getattr(modeling, spec.layer_class)(text, 0).float().eval()
    assert layer.block_type == "full_attention" and hasattr(layer.mlp, "experts")
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

    def norm(name):
        n = getattr(modeling, spec.norm_class)(text.hidden_size, eps=text.rms_norm_eps)
        n.weight.data.copy_(tensors[f"mtp.{name}.weight"])
        return n

    lm = spec.decoder(hf)
    T = ids.shape[1]
    with torch.no_grad():
        h = lm(input_ids=ids).last_hidden_state  # the main model's final hidden state, after its norm
        emb = lm.embed_tokens(ids)
        nxt = torch.cat([emb[:, 1:], torch.zeros_like(emb[:, :1])], 1)  # embed(tok[t + 1]); nothing past the end
        x = torch.cat([norm("pre_fc_norm_embedding")(nxt), norm("pre_fc_norm_hidden")(h)], -1) @ tensors[
            "mtp.fc.weight"].t()
        pos = torch.arange(T)[None]  # the main model's positions of t
        rope = lm.rotary_emb(x, pos[None].expand(3, -1, -1) if spec.mrope else pos)
        # eager attention applies only the mask it is given (none: every position sees the whole row)
        causal = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)[None, None]
        y = layer(x, position_embeddings=rope, attention_mask=causal, position_ids=pos)
        return hf.lm_head(norm("norm")(y))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_native_mtp_logits_equal_the_inference_engine_reference(checkpoints, family, layout):
    hf, path = checkpoints(family, layout)
    model = family.native.from_pretrained(path, mtp_layers=1).eval()
    assert model.checkpoint_source.report.mtp_expert_layout == layout
    ids = torch.randint(0, 400, (1, 37), generator=torch.Generator().manual_seed(4))
    ref = reference_mtp_logits(family, hf, path, ids)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        ours = model.lm_head(out.mtp.hidden_states[0])
    # the last position has no next token: vLLM would feed the sampled one there, nothing is trained on it
    assert (ours[:, :-1] - ref[:, :-1]).abs().max() <= TOL


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_reference_is_decisive_embedding_of_t_instead_of_t_plus_1_differs(checkpoints, family, monkeypatch):
    """Negative control: the same module fed the embedding of t (not t + 1) is far from the reference."""
    import qmoe_lightning.models.causal_lm as causal_lm

    hf, path = checkpoints(family, "fused")
    model = family.native.from_pretrained(path, mtp_layers=1).eval()
    ids = torch.randint(0, 400, (1, 29), generator=torch.Generator().manual_seed(5))
    ref = reference_mtp_logits(family, hf, path, ids)
    real = causal_lm.shifted_embeddings
    monkeypatch.setattr(causal_lm, "shifted_embeddings", lambda e, info, offset: real(e, info, offset - 1))
    with torch.no_grad():
        wrong = model.lm_head(model(input_ids=ids, labels=ids).mtp.hidden_states[0])
    assert (wrong[:, :-1] - ref[:, :-1]).abs().max() > 1e-2


@pytest.mark.parametrize("depths", [1, 2])
@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_packed_mtp_loss_is_the_sum_of_the_documents_alone(checkpoints, family, depths, monkeypatch):
    hf, path = checkpoints(family, "per_expert")
    torch.manual_seed(0)
    model = family.native.from_pretrained(path, mtp_layers=1).eval() if depths == 1 else \
        family.native.from_config(hf.config, mtp_layers=depths).eval()
    docs = documents(family)
    row = pack(docs)
    labels = row["input_ids"].clone()
    if "mm_token_type_ids" in row:
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_round_trip_keeps_names_and_layout_and_transformers_still_loads(checkpoints, family, layout, tmp_path):
    _, path = checkpoints(family, layout)
    model = family.native.from_pretrained(path, mtp_layers=1)
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.add_(0.01)  # "trained"
    out = model.save_pretrained(tmp_path / "export")
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(f))
    source = load_file(str(path / "mtp.safetensors"))
    mtp_written = {k: v for k, v in written.items() if k.startswith("mtp.")}
    assert set(mtp_written) == set(source)  # same names
    assert {k: tuple(v.shape) for k, v in mtp_written.items()} == {k: tuple(v.shape) for k, v in source.items()}
    assert all(torch.allclose(mtp_written[k], source[k] + 0.01) for k in source)
    again = family.native.from_pretrained(out, mtp_layers=1)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    hf, info = family.hf().from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]  # mtp.* ignored by transformers, nothing else unexpected
    assert not [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    # without an MTP module the tensors are copied through unchanged
    plain = family.native.from_pretrained(out)
    assert plain.mtp is None and set(plain.checkpoint_source.passthrough) == set(source)


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_checkpoint_without_mtp_is_refused_or_random_init_on_request(family, tmp_path):
    from qmoe_lightning.models.checkpoint import load_hf_weights

    hf = family.make_hf_model(family.make_config("base"), seed=2)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no multi-token prediction tensors \(mtp\.\*\).*model\.mtp\.init: random"):
        family.native.from_pretrained(tmp_path, mtp_layers=1)
    model = family.native._empty(hf.config, None, "cpu", mtp_layers=1)
    report = load_hf_weights(model, tmp_path, mtp_missing_ok=True)
    assert report.mtp_random_init


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_random_init_on_request_keeps_the_checkpoint_and_fills_the_mtp_module(family, tmp_path):
    from qmoe_lightning.build import build_model

    hf = family.make_hf_model(family.make_config("base"), seed=2)
    hf.save_pretrained(tmp_path)
    built = build_model(family.native, hf.config, checkpoint=tmp_path, model_kwargs={"mtp_layers": 1},
                        mtp_random_init=True, init_seed=5)
    model = built.model
    assert built.source.report.mtp_random_init
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)  # the checkpoint is loaded as it is
    fc = model.mtp.fc.weight
    assert torch.isfinite(fc).all() and 0.01 < fc.std() < 0.03  # the model's init (std 0.02), not garbage
    again = build_model(family.native, hf.config, checkpoint=tmp_path, model_kwargs={"mtp_layers": 1},
                        mtp_random_init=True, init_seed=5).model
    assert torch.equal(again.mtp.fc.weight, fc)  # seeded


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_activation_checkpointing_and_bf16_with_mtp(checkpoints, family):
    _, path = checkpoints(family, "fused")
    batch = one_document(family)
    grads = []
    for checkpointing in (False, True):
        model = family.native.from_pretrained(path, mtp_layers=1).train()
        for block in list(model.text_model.layers) + list(model.mtp.layers):
            block.checkpointing = checkpointing
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("mtp.")})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().max() > 0 for g in grads[0].values())
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    low = family.native.from_pretrained(path, mtp_layers=1, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = low(**batch, labels=batch["input_ids"])
    assert out.mtp.hidden_states[0].dtype == torch.bfloat16 and torch.isfinite(out.mtp.ce).all()


def test_qwen3_vl_moe_refuses_mtp_with_a_reason():
    from qmoe_lightning.lightning_module import QMoELightningModule

    module = QMoELightningModule(pretrained="embedded:qwen3_vl_moe", mtp={"enabled": True})
    with pytest.raises(ValueError, match="Qwen3-VL-MoE has no multi-token prediction module"):
        module.configure_model()


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_padded_rows_left_or_right_give_each_row_its_alone_mtp_loss(checkpoints, family):
    _, path = checkpoints(family, "fused")
    model = family.native.from_pretrained(path, mtp_layers=1).eval()
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


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_more_mtp_layers_than_the_checkpoint_has_is_named_and_export_states_the_depth(checkpoints, family,
                                                                                        tmp_path):
    _, path = checkpoints(family, "fused")
    with pytest.raises(ValueError, match="fewer multi-token prediction layers.*mtp.num_layers"):
        family.native.from_pretrained(path, mtp_layers=2)
    out = family.native.from_pretrained(path, mtp_layers=1).save_pretrained(tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"] if family.has_vision else config  # a text-only config.json is its text config
    assert text["mtp_num_hidden_layers"] == 1


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_lora_with_a_random_mtp_module_is_refused(family, tmp_path):
    from qmoe_lightning.build import build_model

    hf = family.make_hf_model(family.make_config("base"), seed=2)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mtp.init: random with LoRA"):
        build_model(family.native, hf.config, checkpoint=tmp_path, model_kwargs={"mtp_layers": 1},
                    mtp_random_init=True, lora={"rank": 2, "alpha": 4})
