"""State-dict adapter and HF checkpoint I/O: layouts, round trips, transformers loading our exports, bad inputs.

The first section runs on every registered family (families.py; ids name the family), text-only ones (Qwen3-MoE)
included: HF -> native -> HF round trips from every layout a checkpoint comes in, our export loading in transformers'
auto class with the same logits, rotary tables kept in fp32 under bf16, meta init, tied embeddings. Then what only
Qwen3.5-MoE has (per-expert files from transformers, MTP tensors, Gated DeltaNet decay parameters kept in fp32), and
the loader's handling of bad checkpoints and arguments, which does not depend on the family and runs on a Qwen3.5-MoE
checkpoint. Qwen3-VL-MoE's own checks (its published expert layout, the real 30B / 235B key sets) are in
test_model_qwen3_vl_moe_checkpoint.py, Qwen3-MoE's (the 30B-A3B key set) in test_model_qwen3_moe.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, each_family
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_configs import make_config, vision_doc

from qmoe_lightning.models import (
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeStateDictAdapter,
)
from qmoe_lightning.models import checkpoint as ckpt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model of its "alt" tiny config, the directory transformers' save_pretrained wrote),
    each built on first use."""
    built = {}

    def get(family):
        if family.model_type not in built:
            hf = family.make_hf_model(family.make_config("alt"), seed=5)
            path = tmp_path_factory.mktemp(f"hf_{family}")
            hf.save_pretrained(path)
            built[family.model_type] = hf, path
        return built[family.model_type]

    return get


@pytest.fixture(scope="module")
def hf_and_dir(saved):
    """The Qwen3.5-MoE checkpoint of the family-specific and loader tests."""
    return saved(FAMILIES["qwen3_5_moe"])


def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in ckpt.safetensors_files(path):
        out.update(load_file(str(f)))
    return out


# ---- every family ---------------------------------------------------------------------------------------------------


# where a checkpoint's tensors come from: transformers' memory, its save_pretrained files (Qwen3.5, Qwen3-MoE: per
# expert), the published checkpoints' layout (Qwen3-VL-MoE: experts transposed; Qwen3-MoE: per expert)
LAYOUTS = ("in_memory", "saved", "published")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", each_family())
def test_hf_native_hf_round_trip_is_bitwise(saved, family, layout):
    hf, path = saved(family)
    in_memory = dict(hf.state_dict())
    source = {"in_memory": in_memory, "saved": read_all(path), "published": family.published_layout(in_memory)}[layout]
    adapter = family.native.STATE_DICT_ADAPTER(hf.config, text_only=family.native.TEXT_ONLY)
    native, aside = adapter.from_hf(source)
    assert not aside
    assert any(k.endswith("gate_and_up_projs") for k in native)
    # exactly the native model's tensors (Qwen3.5's shared_expert renamed to shared_experts included), same shapes
    model = family.native(hf.config)
    assert {k: tuple(v.shape) for k, v in native.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    back = adapter.to_hf(native)  # always the published layout
    expected = family.published_layout(in_memory)
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    # and the in-memory conversion generation uses gives transformers' layout, as views of the native tensors
    for k, v in native.items():
        for hf_key, t in adapter.convert_single_tensor_to_hf(k, v, in_memory=True):
            assert torch.equal(t, in_memory[hf_key]) and t.data_ptr() == v.data_ptr(), hf_key


@pytest.mark.parametrize("family", each_family())
def test_published_layout_file_loads_like_transformers_file(saved, family, tmp_path):
    hf, path = saved(family)
    save_file(family.published_layout(dict(hf.state_dict())), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a = family.native.from_pretrained(path)
    b = family.native.from_pretrained(tmp_path)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("family", each_family())
def test_our_export_loads_in_transformers_auto_class_with_same_logits(saved, family, tmp_path):
    import transformers

    hf, path = saved(family)
    ours = family.native.from_pretrained(path).eval()
    with torch.no_grad():  # move weights away from the source so the test sees what was written
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out_dir = ours.save_pretrained(tmp_path / "export", max_shard_size="200KB")
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    # the published layout: fused experts (no `.experts.0.`) in each family's orientation, or per expert
    on_disk = read_all(out_dir)
    published = family.published_layout(dict(hf.state_dict()))
    assert {k: v.shape for k, v in on_disk.items()} == {k: v.shape for k, v in published.items()}
    assert any(".experts.0." in k for k in on_disk) == family.published_per_expert
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [family.hf_class]
    auto = getattr(transformers, family.hf_auto_class)
    reloaded, info = auto.from_pretrained(out_dir, output_loading_info=True)
    assert type(reloaded).__name__ == family.hf_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded = reloaded.float().eval()
    reloaded.config.get_text_config()._experts_implementation = "eager"
    ids = torch.randint(0, 400, (1, 33))
    with torch.no_grad():
        if family.has_vision:
            batch = vision_doc([4, ("image", (1, 4, 6)), 7, ("video", (2, 2, 2)), 5], seed=9)
            assert (reloaded(**batch).logits - ours(**batch).logits).abs().max() <= 1e-4
        assert (reloaded(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-4
    assert (out_dir / "generation_config.json").is_file()  # companion files of the source are carried over
    again = family.native.from_pretrained(out_dir)  # and back into the native model, bitwise
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


# the text-only model of a vision-language family (a text-only family's export is the test above)
@pytest.mark.parametrize("family", each_family(lambda f: f.has_vision and f.native_text is not None))
def test_text_only_export_loads_in_transformers_causal_lm(saved, family, tmp_path):
    _, path = saved(family)
    ours = family.native_text.from_pretrained(path).eval()
    out_dir = ours.save_pretrained(tmp_path / "text")
    reloaded, info = family.hf_text().from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded = reloaded.float().eval()
    ids = torch.randint(0, 400, (2, 21))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", each_family())
def test_bf16_keeps_rotary_inv_freq_fp32(saved, family):
    _, path = saved(family)
    model = family.native.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.text_model.rotary_emb.inv_freq.dtype == torch.float32
    if family.has_vision:
        assert model.model.visual.rotary_pos_emb.inv_freq.dtype == torch.float32
    fp32 = family.native.from_pretrained(path).eval()
    inv = fp32.text_model.rotary_emb.inv_freq.clone()
    fp32.to(torch.bfloat16)  # a cast of a loaded model must not round it either
    assert torch.equal(fp32.text_model.rotary_emb.inv_freq, inv)
    hi_model = family.native.from_pretrained(path).eval()
    batches = [dict(input_ids=torch.randint(0, 400, (1, 40)))]
    if family.has_vision:
        batches.append(vision_doc([4, ("image", (1, 4, 4)), 6], seed=2))
    for batch in batches:
        with torch.no_grad():
            lo = model(**batch).logits.float()
            hi = hi_model(**batch).logits
        assert torch.isfinite(lo).all() and (lo - hi).abs().max() < 0.05 * hi.abs().max()


@pytest.mark.parametrize("family", each_family())
def test_from_config_meta_init_gives_finite_outputs(family):
    model = family.native.from_config(family.make_config("base")).eval()
    assert not any(p.is_meta for p in model.parameters())
    assert model.text_model.rotary_emb.inv_freq.abs().sum() > 0
    ids = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", each_family())
def test_tied_embeddings_survive_meta_construction_and_loading(family, tmp_path):
    """`to_empty` unties what __init__ tied: the model must re-tie, or lm_head stays uninitialised memory that the
    loader (which skips lm_head for a tied config) never fills."""
    config = family.make_config("base")
    config.tie_word_embeddings = True
    hf = family.make_hf_model(config, seed=3)
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    hf.save_pretrained(tmp_path)
    model = family.native.from_pretrained(tmp_path).eval()
    assert model.lm_head.weight is model.text_model.embed_tokens.weight
    ids = torch.randint(0, 400, (1, 17))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max() <= 1e-4
    fresh = family.native.from_config(hf.config)
    assert fresh.lm_head.weight is fresh.text_model.embed_tokens.weight


# ---- Qwen3.5-MoE only (per-expert saves, MTP, Gated DeltaNet) --------------------------------------------------------


def test_transformers_save_is_per_expert_and_in_memory_is_fused(hf_and_dir):
    hf, path = hf_and_dir
    on_disk = read_all(path)
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in on_disk)
    assert any(k.endswith(".mlp.experts.gate_up_proj") for k in hf.state_dict())


def test_mtp_tensors_are_kept_aside_and_copied_through(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    src = tmp_path / "with_mtp"
    src.mkdir()
    for f in path.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    mtp = {"mtp.fc.weight": torch.randn(64, 128), "mtp.norm.weight": torch.randn(64)}
    save_file(mtp, str(src / "mtp.safetensors"))
    index_file = src / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
    else:
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    index_file.write_text(json.dumps(index))

    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(src)
    assert model.checkpoint_source.report.skipped["mtp"] == 2
    out = read_all(model.save_pretrained(tmp_path / "export"))
    for k, v in mtp.items():
        assert torch.equal(out[k], v)


def test_bf16_keeps_gdn_decay_params_fp32(hf_and_dir):
    """The rotary tables and the logits under bf16: test_bf16_keeps_rotary_inv_freq_fp32 (every family)."""
    hf, path = hf_and_dir
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    gdn = model.model.language_model.layers[1].linear_attn
    assert gdn.A_log.dtype == torch.float32 and gdn.dt_bias.dtype == torch.float32
    assert torch.equal(gdn.A_log, hf.model.language_model.layers[1].linear_attn.A_log)  # not rounded to bf16


def test_bf16_saved_export_keeps_fp32_decay_params(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    out = Qwen3_5MoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path / "e")
    tensors = read_all(out)
    assert tensors["model.language_model.layers.1.linear_attn.A_log"].dtype == torch.float32
    assert tensors["model.language_model.layers.1.linear_attn.dt_bias"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ---- the loader and writer: any family, tested on the Qwen3.5-MoE checkpoint -----------------------------------------


def test_lm_head_under_model_prefix_and_text_prefix_are_read(hf_and_dir, tmp_path):
    hf, path = hf_and_dir
    tensors = read_all(path)
    tensors["model.lm_head.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_failed_save_leaves_previous_export_intact(hf_and_dir, tmp_path, monkeypatch):
    _, path = hf_and_dir
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(path)
    out = model.save_pretrained(tmp_path / "export", max_shard_size="300KB")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    calls = {"n": 0}
    real_save = ckpt.save_file

    def crash_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second_shard)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "export", max_shard_size="300KB")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind


# ---- bad checkpoints name the problem ---------------------------------------------------------------------------


def copy_ckpt(path, dst):
    dst.mkdir()
    for f in path.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_weights(dst, fn):
    tensors = read_all(dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(fn(tensors), str(dst / "model.safetensors"))


def test_wrong_model_type_is_rejected(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    dst = copy_ckpt(path, tmp_path / "c")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llama' cannot be loaded by Qwen3_5MoeForConditionalGeneration"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(dst)
    from qmoe_lightning.models.registry import load_config

    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not supported; expected one of"):
        load_config(dst)  # what the app checks (the registry's families)


def test_missing_and_unexpected_tensors_are_listed(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    dst = copy_ckpt(path, tmp_path / "c")

    def damage(t):
        t.pop("model.language_model.norm.weight")
        t.pop("model.language_model.layers.0.mlp.experts.3.up_proj.weight")
        t["model.language_model.layers.0.bogus.weight"] = torch.zeros(2)
        return t

    rewrite_weights(dst, damage)
    with pytest.raises(ValueError) as err:
        Qwen3_5MoeForConditionalGeneration.from_pretrained(dst)
    msg = str(err.value)
    assert "model.language_model.norm.weight" in msg
    assert "layers.0.mlp.experts.gate_and_up_projs (1 expert slice(s))" in msg
    assert "model.language_model.layers.0.bogus.weight" in msg


def test_wrong_shape_names_the_tensor(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    dst = copy_ckpt(path, tmp_path / "c")

    def damage(t):
        t["model.language_model.layers.2.mlp.experts.1.down_proj.weight"] = torch.zeros(3, 3)
        return t

    rewrite_weights(dst, damage)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts\.1\.down_proj\.weight.*shape \(3, 3\)"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(dst)


def test_missing_files_are_reported(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    with pytest.raises(FileNotFoundError, match="is neither a local directory .* nor a hub model id"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(empty)
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(empty)


def test_export_refuses_a_shard_of_the_experts(hf_and_dir):
    hf, _ = hf_and_dir
    adapter = Qwen3_5MoeStateDictAdapter(hf.config, text_only=False)
    E = hf.config.text_config.num_experts
    shard = torch.zeros(E // 2, 64, 2 * hf.config.text_config.moe_intermediate_size)
    with pytest.raises(ValueError, match=f"holds {E // 2} of {E} experts"):
        adapter.convert_single_tensor_to_hf("model.language_model.layers.0.mlp.experts.gate_and_up_projs", shard)


def test_vl_class_refuses_text_only_checkpoint(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    text_dir = Qwen3_5MoeForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match=r"'qwen3_5_moe_text' cannot be loaded by Qwen3_5MoeForConditionalGeneration.*"
                                         r"text-only model class"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(text_dir)


def test_a_second_bf16_cast_keeps_fp32_values_exact():
    """Lightning's bf16-true casts the whole module (`module.to(bf16)`) after configure_model: A_log / dt_bias and
    fp32 LoRA adapters must come back with their exact fp32 values, not bf16-rounded ones (nn.Module._apply casts
    a Parameter in place, so the guard has to keep a copy)."""
    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config(), dtype=torch.bfloat16)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, adapter_dtype="float32"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.add_(torch.rand_like(p) * 1e-3)  # values bf16 cannot represent
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert any("A_log" in n for n in fp32) and any("lora_B" in n for n in fp32)
    model.to(torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 and torch.equal(params[n], v) for n, v in fp32.items())


# ---- loading as a user would (bad-input probe of the reliability issue) -------------------------------------------


def test_from_pretrained_takes_the_checkpoint_dtype_and_exports_one_dtype(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    bf16 = Qwen3_5MoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    out = bf16.save_pretrained(tmp_path / "bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["text_config"].get("dtype", "bfloat16") == "bfloat16"  # no sub-config left saying otherwise
    auto = Qwen3_5MoeForConditionalGeneration.from_pretrained(out)  # default "auto": the checkpoint's dtype
    assert auto.lm_head.weight.dtype == torch.bfloat16  # it used to build fp32: twice the memory
    assert {p.dtype for n, p in auto.named_parameters() if n.endswith("A_log")} == {torch.float32}  # fp32 as always
    assert Qwen3_5MoeForConditionalGeneration.from_pretrained(out, dtype=None).lm_head.weight.dtype == torch.float32
    fp32 = Qwen3_5MoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).save_pretrained(tmp_path / "f")
    cfg = json.loads((fp32 / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["text_config"].get("dtype", "float32") == "float32"


def test_meta_device_reads_no_tensor_data_but_still_checks_the_checkpoint(hf_and_dir, tmp_path, monkeypatch):
    _, path = hf_and_dir
    reads = []
    real_get_tensor = ckpt.read_tensor

    def counting(f, file, key, meta=False):
        if not meta:
            reads.append(key)
        return real_get_tensor(f, file, key, meta)

    monkeypatch.setattr(ckpt, "read_tensor", counting)
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(path, device="meta")
    assert model.lm_head.weight.is_meta and reads == []  # every tensor used to be read for nothing
    bad = copy_ckpt(path, tmp_path / "bad")
    rewrite_weights(bad, lambda t: {k: (v[:-1] if k == "lm_head.weight" else v) for k, v in t.items()})
    with pytest.raises(ValueError, match="lm_head.weight"):  # a wrong shape is still found from the headers
        Qwen3_5MoeForConditionalGeneration.from_pretrained(bad, device="meta")


def test_truncated_safetensors_names_the_file(hf_and_dir, tmp_path):
    _, path = hf_and_dir
    dst = copy_ckpt(path, tmp_path / "cut")
    shard = sorted(dst.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=rf"{shard.name}.*damaged or truncated"):
        Qwen3_5MoeForConditionalGeneration.from_pretrained(dst)


def test_missing_local_path_that_looks_like_a_hub_id_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'myorg/my-model': there is no such local directory .*hub repo"):
        ckpt.resolve_checkpoint_dir("myorg/my-model")


def test_model_config_of_another_model_type_is_named(tmp_path):
    from qmoe_lightning.models.registry import config_from, family_of_model, supported_model_types

    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        config_from({"model_type": "llama", "hidden_size": 64})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match=rf"model_config {path}: model_type 'mixtral'"):
        config_from(str(path))
    # a text-only config's keys are the text model's
    text = config_from({"model_type": "qwen3_5_moe_text", "hidden_size": 48})
    assert text.model_type == "qwen3_5_moe" and text.text_config.hidden_size == 48
    # the registry knows the family of every native class, wrapped ones (FSDP2's swap) included
    assert supported_model_types() == ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen3_vl_moe")
    wrapped = type("FSDPQwen3_5MoeForCausalLM", (Qwen3_5MoeForCausalLM,), {})
    assert wrapped.hf_architecture() == "Qwen3_5MoeForCausalLM"
    with torch.device("meta"):
        model = wrapped(text)
    assert family_of_model(model).name == "Qwen3.5-MoE" and model.state_dict_adapter().text_only
