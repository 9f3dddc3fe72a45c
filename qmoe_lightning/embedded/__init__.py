"""Embedded default: a tiny Qwen3.5-MoE checkpoint, its tokenizer/processor and a synthetic multimodal dataset,
built deterministically into a cache directory on first use (no downloads). See `builder.py`.

YAML configs select it with the sentinel string `embedded` (e.g. `model_path: embedded`, `train_path: embedded`,
`val_path: embedded`), and the tiny Qwen3-VL-MoE with `embedded:qwen3_vl_moe`; `resolve_path` maps a sentinel to
the built paths.
"""

from .builder import (EMBEDDED_MODELS, SENTINEL, EmbeddedDefault, default_cache_dir, embedded_model_name,
                      ensure_embedded_default, ensure_embedded_model, resolve_path)

__all__ = ["EMBEDDED_MODELS", "SENTINEL", "EmbeddedDefault", "default_cache_dir", "embedded_model_name",
           "ensure_embedded_default", "ensure_embedded_model", "resolve_path"]
