"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B and their Coder / Instruct-2507 / Thinking variants): a text-only family
on the shared attention-only decoder, and its checkpoint names. Registered in `registry.py`."""

from .modeling import Qwen3MoeForCausalLM, Qwen3MoeStateDictAdapter

__all__ = ["Qwen3MoeForCausalLM", "Qwen3MoeStateDictAdapter"]
