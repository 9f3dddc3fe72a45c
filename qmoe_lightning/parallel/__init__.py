"""Expert parallelism + FSDP2 for the native Qwen3.5-MoE models, applied from outside the model files.

- `expert_parallel`: in-place EP conversion of `GroupedExperts` / `LoRAGroupedExperts` (E/ep local experts,
  all-to-all token dispatch, exact against one process).
- `parallelize`: the mesh ("replicate", "efsdp", "ep" + flattened "dp_shard", "data_parallel") and
  `parallelize_model` (EP -> per-block activation checkpointing with routing replay -> FSDP2, expert gradient
  divide factor, gloo settings).
- `clip`: EP-aware global gradient norm / clipping across mixed meshes.
- `strategy`: `ExpertParallelStrategy(ModelParallelStrategy)` building that mesh (YAML: ep_size, replicate).
Not done yet: rank-local safetensors loading of expert slices, HF export / DCP resume of EP-sharded experts.
"""
