"""Expert parallelism + FSDP2 for the native Qwen3.5-MoE models, applied from outside the model files.

- `expert_parallel`: in-place EP conversion of `GroupedExperts` / `LoRAGroupedExperts` (E/ep local experts,
  all-to-all token dispatch, exact against one process).
"""
