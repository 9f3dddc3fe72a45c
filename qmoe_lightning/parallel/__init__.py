"""Expert parallelism, context parallelism and FSDP2 for the native models (every registered family), applied from
outside the model files; what was applied is the model's `ParallelContext` (`models/parallel_context.py`).

- `expert_parallel`: in-place EP conversion of `GroupedExperts` / `LoRAGroupedExperts` (E/ep local experts,
  all-to-all token dispatch, exact against one process).
- `parallelize`: the mesh ("replicate", "efsdp", "ep" + flattened "dp_shard", "data_parallel") and
  `parallelize_model` (CP -> EP -> per-block activation checkpointing with routing replay -> FSDP2, expert
  gradient divide factor, gloo settings, every rank runs the vision tower).
- `context_parallel`: the cp group's collectives and the row split (`ContextParallelRows`) the model's forward calls.
- `state`: global (E, ...) DTensor views of the local expert slices, for distributed checkpoints, the gathered
  HF / PEFT export and rank-local loading.
- `loading`: rank-local loading of a Hugging Face checkpoint into a parallelised model (only owned slices read).
- `clip`: EP-aware global gradient norm / clipping across mixed meshes.
- `strategy`: `ExpertParallelStrategy(ModelParallelStrategy)` building that mesh (YAML: ep_size, replicate,
  cp_size), with DCP checkpoints of the global views.
"""
