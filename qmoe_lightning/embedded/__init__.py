"""Embedded default: a tiny Qwen3.5-MoE checkpoint, its tokenizer/processor and a synthetic multimodal dataset,
built deterministically into a cache directory on first use (no downloads). See `builder.py`.

YAML configs select it with the sentinel string `embedded` (e.g. `model_path: embedded`, `train_path: embedded`,
`val_path: embedded`); `resolve_path` maps the sentinel to the built paths.
"""

from .builder import SENTINEL, EmbeddedDefault, default_cache_dir, ensure_embedded_default, resolve_path

__all__ = ["SENTINEL", "EmbeddedDefault", "default_cache_dir", "ensure_embedded_default", "resolve_path"]
