"""Builds the embedded default (tiny Qwen3.5-MoE checkpoint + tokenizer/processor + synthetic dataset) on first use,
and on request a tiny Qwen3-VL-MoE checkpoint (same tokenizer, processor and data) or a tiny text-only Qwen3-MoE or
Qwen3-Next checkpoint (same tokenizer, no image processor: their runs train on the text rows and count the image rows
as skips) beside it.

Nothing is downloaded: the tokenizer is trained on generated text, the weights come from
`transformers.Qwen3_5MoeForConditionalGeneration(config)` under a fixed seed, the dataset is drawn with PIL.

Layout of `<cache_dir>/embedded-v<VERSION>/`:
    model/   config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
             preprocessor_config.json, video_preprocessor_config.json, processor_config.json
    model-qwen3_vl_moe/   the same files, a Qwen3-VL-MoE config and weights (built on first use of
             `embedded:qwen3_vl_moe`, with its own BUILD_OK)
    model-qwen3_moe/   tokenizer files and chat template only, a Qwen3-MoE config and weights (`embedded:qwen3_moe`)
    model-qwen3_next/  the same for Qwen3-Next, with an MTP layer (`embedded:qwen3_next`)
    data/    train.jsonl, val.jsonl, images/*.png

Sentinels: `embedded` (the Qwen3.5-MoE model, and the data), `embedded:qwen3_vl_moe` / `embedded:qwen3_moe` /
`embedded:qwen3_next` (those models; as a data path they mean the same data).

Notable choices:
- Atomic and idempotent: everything is written into a temporary sibling directory which is then renamed into
  place; a concurrent builder (another rank, another test process) that loses the rename race just discards its
  copy. A finished build is recognised by the `BUILD_OK` marker, never by partial content.
- Bump VERSION whenever the recipe changes so stale caches are never reused.
- The processor is transformers' own `Qwen3VLProcessor` (what `AutoProcessor` maps `qwen3_5_moe` to in 5.23) with
  the PIL image backend (`Qwen2VLImageProcessorPil`), because torchvision is not a dependency. The video processor
  (`Qwen3VLVideoProcessor`) needs torchvision; its config is written anyway so videos work where it is installed.
- Images are 64x64 px with min/max pixels 32*32..64*64 and patch 16 / merge 2: one image is 4 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..export_dir import follow_umask
from .synthetic import tokenizer_corpus, write_split
from .tokenizer import save_tokenizer, train_tokenizer

VERSION = 3  # 2: position questions; rotary that can tell image columns apart; 3: an MTP layer (mtp.*)
SEED = 1234
VOCAB_SIZE = 512
IMAGE_SIZE = 64
N_TRAIN, N_VAL = 3000, 500  # ~70 held-out questions per image kind
IMAGE_FRACTION = 0.7
SENTINEL = "embedded"  # value of model_path / train_path / val_path that selects the embedded default
EMBEDDED_MODELS = ("qwen3_5_moe", "qwen3_vl_moe", "qwen3_moe", "qwen3_next")  # `embedded:<name>`; plain `embedded` is the first

# Tiny sizes from model_reference.md (TINY_QWEN3_5_MOE); token ids are filled in from the tokenizer.
TEXT_CONFIG = dict(
    hidden_size=64, num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    max_position_embeddings=4096, router_aux_loss_coef=0.001,
    # All 16 head dims rotate (8 frequencies: T gets 4, H and W 2 each) with theta 100, so the two columns / rows of
    # a 64 px image's 2 x 2 vision tokens differ by 0.32 / 0.56 rad on their fastest W / H frequency. The
    # 35B-style values scaled down (theta 1e7, half the dims, mrope [2, 1, 1]) gave W one frequency of 3e-4 rad
    # per position: attention could not tell left from right. Text documents here are < 100 tokens.
    rope_parameters=dict(rope_type="default", rope_theta=100.0, partial_rotary_factor=1.0, mrope_section=[4, 2, 2],
                         mrope_interleaved=True),
)
VISION_CONFIG = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                     temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64)

# Tiny Qwen3-VL-MoE: the Qwen3.5 sizes where they exist (and the same rotary, for the same reason), every layer full
# attention, layer 1 a dense MLP (mlp_only_layers, so dense-MLP LoRA and the dense path run), deepstack from both
# vision blocks. moe_intermediate 48: 2I != H, so the published and transformers' expert layouts differ in shape.
VL_MOE_TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
    mlp_only_layers=[1], max_position_embeddings=4096, router_aux_loss_coef=0.001,
    rope_parameters=dict(rope_type="default", rope_theta=100.0, mrope_section=[4, 2, 2], mrope_interleaved=True),
)
VL_MOE_VISION_CONFIG = dict(VISION_CONFIG, deepstack_visual_indexes=[0, 1])

# Tiny Qwen3-MoE: the Qwen3-VL-MoE text sizes (layer 1 dense), plain RoPE with the same small theta, top-k
# renormalised as the published Qwen3-MoE checkpoints do.
QWEN3_MOE_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
    mlp_only_layers=[1], norm_topk_prob=True, max_position_embeddings=4096, router_aux_loss_coef=0.001,
    rope_parameters=dict(rope_type="default", rope_theta=100.0), tie_word_embeddings=False,
)
# Tiny Qwen3-Next: the Qwen3.5 text sizes (3 Gated DeltaNet layers, then gated attention), layer 1 a dense MLP
# (mlp_only_layers), plain RoPE over half of each head with the same small theta, one MTP layer as published.
QWEN3_NEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
    max_position_embeddings=4096, router_aux_loss_coef=0.001, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=100.0, partial_rotary_factor=0.5),
    mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
)
# what a text-only model directory keeps of the shared files (no image / video processor)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True)
class EmbeddedDefault:
    root: Path
    model_dir: Path
    train_path: Path
    val_path: Path


def default_cache_dir() -> Path:
    """$QMOE_LIGHTNING_CACHE, else $XDG_CACHE_HOME/qmoe_lightning, else ~/.cache/qmoe_lightning."""
    if env := os.environ.get("QMOE_LIGHTNING_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qmoe_lightning"


def _paths(root: Path) -> EmbeddedDefault:
    return EmbeddedDefault(root, root / "model", root / "data" / "train.jsonl", root / "data" / "val.jsonl")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _processor_configs(model_dir: Path) -> None:
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                  image_std=[0.5, 0.5, 0.5], do_resize=True, do_rescale=True, do_normalize=True,
                  do_convert_rgb=True, rescale_factor=1 / 255, resample=3)
    _write_json(model_dir / "preprocessor_config.json", dict(
        common, image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3VLProcessor",
        size={"shortest_edge": 32 * 32, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}))
    _write_json(model_dir / "video_preprocessor_config.json", dict(
        common, video_processor_type="Qwen3VLVideoProcessor", processor_class="Qwen3VLProcessor",
        size={"shortest_edge": 32 * 32 * 2, "longest_edge": IMAGE_SIZE * IMAGE_SIZE * 8}, fps=2, min_frames=2,
        max_frames=8, do_sample_frames=False))
    _write_json(model_dir / "processor_config.json", {"processor_class": "Qwen3VLProcessor"})


def _build_model(model_dir: Path, special_ids: dict[str, int], vocab_size: int) -> None:
    import torch
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = dict(TEXT_CONFIG, vocab_size=vocab_size, eos_token_id=special_ids["<|im_end|>"],
                pad_token_id=special_ids["<|endoftext|>"], bos_token_id=None, mtp_num_hidden_layers=1,
                mtp_use_dedicated_embeddings=False)
    config = Qwen3_5MoeConfig(
        text_config=text, vision_config=dict(VISION_CONFIG),
        image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"], vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # Seeded init in a private generator state: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3_5MoeForConditionalGeneration(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    from ..models.qwen3_5_moe import Qwen3_5MoeForConditionalGeneration

    _add_mtp_tensors(model_dir, config, Qwen3_5MoeForConditionalGeneration)


def _add_mtp_tensors(model_dir: Path, config, Native) -> None:
    """The published checkpoints carry an MTP layer (`mtp.*`) that transformers ignores: the tiny one gets one too,
    randomly initialised like the rest (by the native class `Native`), its experts per expert as Qwen3.5-35B-A3B
    and Qwen3-Next-80B-A3B store them."""
    import torch
    from safetensors.torch import load_file, save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        donor = Native.from_config(config, mtp_layers=1)
    adapter = donor.state_dict_adapter()
    adapter.mtp_expert_layout = "per_expert"
    mtp = {}
    for key, tensor in donor.state_dict().items():
        if key.startswith("mtp."):
            mtp.update((k, t.contiguous()) for k, t in adapter.convert_single_tensor_to_hf(key, tensor))
    weights = model_dir / "model.safetensors"
    save_file({**load_file(weights), **mtp}, str(weights), metadata={"format": "pt"})


def _build(root_tmp: Path, with_model: bool = True) -> None:
    model_dir, data_dir = root_tmp / "model", root_tmp / "data"
    data_dir.mkdir(parents=True)
    tok = train_tokenizer(tokenizer_corpus(SEED), VOCAB_SIZE)
    ids = save_tokenizer(tok, model_dir, model_max_length=TEXT_CONFIG["max_position_embeddings"])
    _processor_configs(model_dir)
    if with_model:
        _build_model(model_dir, ids, tok.get_vocab_size())
    write_split(data_dir, "train", N_TRAIN, SEED, IMAGE_FRACTION, IMAGE_SIZE)
    write_split(data_dir, "val", N_VAL, SEED, IMAGE_FRACTION, IMAGE_SIZE)
    (root_tmp / "BUILD_OK").write_text(f"version {VERSION}\n")


def ensure_embedded_default(cache_dir: str | os.PathLike | None = None) -> EmbeddedDefault:
    """Return the paths of the embedded default, building it first if it is not in the cache yet."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / f"embedded-v{VERSION}"
    if (root / "BUILD_OK").is_file():
        return _paths(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".embedded-v{VERSION}-", dir=base))
    try:
        _build(tmp)
        follow_umask(tmp)  # mkdtemp makes it 0700 and safetensors writes 0600: other users could not read it
        try:
            os.rename(tmp, root)  # atomic on one filesystem; fails if another builder finished first
        except OSError:
            if not (root / "BUILD_OK").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def embedded_model_name(value) -> str | None:
    """`embedded` -> "qwen3_5_moe", `embedded:<name>` -> name, anything else -> None (not a sentinel)."""
    text = str(value) if value is not None else ""
    if text == SENTINEL:
        return EMBEDDED_MODELS[0]
    if not text.startswith(SENTINEL + ":"):
        return None
    name = text[len(SENTINEL) + 1:]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"{text!r}: no embedded model {name!r}; expected one of "
                         f"{[SENTINEL] + [f'{SENTINEL}:{n}' for n in EMBEDDED_MODELS[1:]]}")
    return name


def _build_vl_moe_model(source_dir: Path, model_dir: Path) -> None:
    import torch
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    model_dir.mkdir()
    for f in source_dir.iterdir():  # tokenizer, chat template, processor configs: shared with the Qwen3.5 model
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy2(f, model_dir / f.name)
    src = json.loads((source_dir / "config.json").read_text())
    text = src["text_config"]
    ids = {k: src[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLMoeConfig(
        text_config=dict(VL_MOE_TEXT_CONFIG, vocab_size=text["vocab_size"], eos_token_id=text["eos_token_id"],
                         pad_token_id=text["pad_token_id"], bos_token_id=None),
        vision_config=dict(VL_MOE_VISION_CONFIG), tie_word_embeddings=False, **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3VLMoeForConditionalGeneration(config)
    model.save_pretrained(model_dir, safe_serialization=True)


def _build_text_model(source_dir: Path, model_dir: Path, config_class: str, model_class: str, spec: dict) -> None:
    """A tiny text-only model of transformers' `model_class` (`config_class(**spec)`), the embedded tokenizer's
    vocabulary and special tokens, the tokenizer files only (no image processor)."""
    import torch
    import transformers

    model_dir.mkdir()
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, model_dir / name)
    text = json.loads((source_dir / "config.json").read_text())["text_config"]
    config = getattr(transformers, config_class)(**spec, vocab_size=text["vocab_size"], bos_token_id=None,
                                                  eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = getattr(transformers, model_class)(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    if spec.get("mtp_num_hidden_layers"):
        from ..models.registry import family_of

        _add_mtp_tensors(model_dir, config, family_of(config.model_type).text_only)


_MODEL_BUILDERS = {
    "qwen3_vl_moe": _build_vl_moe_model,
    "qwen3_moe": partial(_build_text_model, config_class="Qwen3MoeConfig", model_class="Qwen3MoeForCausalLM",
                         spec=QWEN3_MOE_CONFIG),
    "qwen3_next": partial(_build_text_model, config_class="Qwen3NextConfig", model_class="Qwen3NextForCausalLM",
                          spec=QWEN3_NEXT_CONFIG),
}


def ensure_embedded_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The model directory of embedded model `name` (see EMBEDDED_MODELS), built first if needed (atomically)."""
    emb = ensure_embedded_default(cache_dir)
    if name == EMBEDDED_MODELS[0]:
        return emb.model_dir
    target = emb.root / f"model-{name}"
    if (target / "BUILD_OK").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".model-{name}-", dir=emb.root))
    try:
        _MODEL_BUILDERS[name](emb.model_dir, tmp / "model")
        (tmp / "model" / "BUILD_OK").write_text(f"version {VERSION}\n")
        follow_umask(tmp)
        try:
            os.rename(tmp / "model", target)  # atomic; fails if another builder finished first
        except OSError:
            if not (target / "BUILD_OK").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_path(value: str | os.PathLike | None, kind: str, cache_dir: str | os.PathLike | None = None):
    """Map an `embedded` sentinel to a real path (kind: 'model', 'train' or 'val'); other values pass through."""
    name = embedded_model_name(value)
    if name is None:
        return value
    if kind == "model":
        return str(ensure_embedded_model(name, cache_dir))
    emb = ensure_embedded_default(cache_dir)
    return str({"train": emb.train_path, "val": emb.val_path}[kind])
