"""LoRA after training == transformers + peft adapter == merged export (ours and transformers'), fp32, <= 1e-4.

Each case: build transformers' tiny model, save it, load it natively, apply LoRA, train a few AdamW steps (B becomes
non-zero, dropout where configured), then compare the native LoRA logits with
- transformers + `peft.PeftModel.from_pretrained(hf_model, hf_adapter)` (no missing / unexpected keys),
- our `from_pretrained` of the merged export, and transformers' `from_pretrained` of it.
Cases cover: expert rank != rank (rank_pattern), an odd rank (padded grouped GEMM), all-linear + vision with an image
input, a partial target (full module names in target_modules), an excluded experts layer (zero-filled PEFT
tensors), one expert projection only, and dropout during training; for Qwen3-VL-MoE its default targets (attention,
dense MLP layers, routed experts) on image + video input and all-linear with deepstack mergers in the vision group.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from tiny_configs import make_config, make_hf_model, make_hf_vl_moe_model, make_vl_moe_config, vision_doc

from qmoe_lightning.lora import (LoraConfig, apply_lora, is_adapter_key, lora_modules, save_merged_pretrained,
                                 save_peft_adapter)
from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: with 2 threads on a shared 2-core machine every op spin-waits (~15x slower); restored after
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

CASES = {
    # default targets, experts at a smaller rank, one linear-attention projection left out in layer 0
    "base": (dict(rank=4, alpha=8, expert_rank=2, exclude=[r"re:model\.language_model\.layers\.0\.linear_attn\.in_proj_qkv"]),
             [5, ("image", (1, 4, 4)), 7]),
    # all-linear + vision; rank 3 (12-byte rows: the grouped GEMM pads the rank)
    "alt": (dict(rank=3, alpha=6, targets=["all-linear", "vision"]), [4, ("image", (1, 4, 6)), 9]),
    # attention + down projection of the experts only, experts of layer 0 excluded, dropout while training
    "wide": (dict(rank=4, alpha=4, dropout=0.1, targets=["attention", "experts"], expert_projections=["down"],
                  exclude=[r"re:.*layers\.0\.mlp\.experts"]), [6, ("image", (1, 2, 4)), 5]),
    # Qwen3-VL-MoE: its default targets, experts at a smaller rank, image + video
    "vl_default": (dict(rank=4, alpha=8, expert_rank=2), [3, ("image", (1, 4, 4)), 4, ("video", (2, 2, 4)), 5]),
    # Qwen3-VL-MoE: all-linear + vision (the deepstack mergers included), odd rank
    "vl_all_linear": (dict(rank=3, alpha=6, targets=["all-linear", "vision"]), [4, ("image", (1, 4, 6)), 9]),
}


def _family(variant: str):
    """(transformers model, native class, transformers class) of a case."""
    import transformers

    if variant.startswith("vl_"):
        config = make_vl_moe_config("base" if variant == "vl_default" else "alt")
        return (make_hf_vl_moe_model(config, seed=7), Qwen3VLMoeForConditionalGeneration,
                transformers.Qwen3VLMoeForConditionalGeneration)
    return make_hf_model(make_config(variant), seed=7), Qwen3_5MoeForConditionalGeneration, \
        transformers.Qwen3_5MoeForConditionalGeneration


def _train(model, doc, steps: int = 3) -> None:
    """A few AdamW steps on image + text documents (so vision adapters train too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for step in range(steps):
        batch = vision_doc(doc, seed=100 + step)
        loss = model(**batch, labels=batch["input_ids"], output_router_logits=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _eager(hf):
    hf.config._experts_implementation = "eager"
    hf.config.text_config._experts_implementation = "eager"
    return hf.float().eval()


@pytest.mark.parametrize("variant", list(CASES))
def test_trained_lora_matches_peft_and_merged_exports(tmp_path, variant):
    lora_kwargs, doc = CASES[variant]
    hf, native_class, hf_class = _family(variant)
    base_dir = tmp_path / "base"
    hf.save_pretrained(base_dir)
    nat = native_class.from_pretrained(base_dir)
    report = apply_lora(nat, LoraConfig(**lora_kwargs))
    assert report.total_trainable > 0

    _train(nat, doc)
    mods = lora_modules(nat)
    # training moved every B off zero (so the comparison below tests the adapters, not the base)
    for name, p in nat.named_parameters():
        if is_adapter_key(name) and "lora_B" in name:
            assert p.abs().max() > 0, name

    batch = vision_doc(doc, seed=11)
    text = torch.randint(0, 400, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_mm = nat(**batch).logits
        out_text = nat(input_ids=text).logits

    # ---- PEFT adapter on transformers' model
    adapter_dir = save_peft_adapter(nat, tmp_path / "hf_adapter", base_model_name_or_path=str(base_dir))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert cfg["lora_dropout"] == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m or "were ignored" in m and "keyword" in m], messages
    # strict key check: peft reports what it could not fill / did not use
    result = pm.load_adapter(str(adapter_dir), adapter_name="check")
    assert not [k for k in result.missing_keys if "lora_" in k], result.missing_keys[:5]
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    pm.set_adapter("default")
    # peft built exactly the modules we adapted (plus zero-filled excluded expert layers), at our ranks
    with torch.no_grad():
        ref_mm = pm(**batch).logits
        ref_text = pm(input_ids=text).logits
    assert (ref_mm - out_mm).abs().max() <= TOL
    assert (ref_text - out_text).abs().max() <= TOL

    # ---- merged export: ours and transformers'
    export = save_merged_pretrained(nat, tmp_path / "hf_export")
    assert len(lora_modules(nat)) == len(mods)  # non-destructive
    merged = native_class.from_pretrained(export).eval()
    assert not lora_modules(merged)
    hf_merged = _eager(hf_class.from_pretrained(export, dtype=torch.float32))
    with torch.no_grad():
        assert (merged(**batch).logits - out_mm).abs().max() <= TOL
        assert (merged(input_ids=text).logits - out_text).abs().max() <= TOL
        assert (hf_merged(**batch).logits - out_mm).abs().max() <= TOL
        assert (hf_merged(input_ids=text).logits - out_text).abs().max() <= TOL
