"""Qwen3-Next (Qwen3-Next-80B-A3B Instruct / Thinking): a text-only family on the shared hybrid decoder, with its
projection layout and checkpoint names. Registered in `registry.py`."""

from .modeling import Qwen3NextForCausalLM, Qwen3NextStateDictAdapter

__all__ = ["Qwen3NextForCausalLM", "Qwen3NextStateDictAdapter"]
