"""Expert parallelism, context parallelism and FSDP2 for the native models (both families), applied from outside
the model files.

- `expert_parallel`: in-place EP conversion of `GroupedExperts` / `LoRAGroupedExperts` (E/ep local experts,
  all-to-all token dispatch, exact against one process).
- `parallelize`: the mesh ("replicate", "efsdp", "ep" + flattened "dp_shard", "data_parallel") and
  `parallelize_model` (EP -> per-block activation checkpointing with routing replay -> FSDP2, expert gradient
  divide factor, gloo settings, every rank runs the vision tower).
- `state`: global (E, ...) DTensor views of the local expert slices, for distributed checkpoints, the gathered
  HF / PEFT export and rank-local loading.
- `loading`: rank-local loading of a Hugging Face checkpoint into a parallelised model (only owned slices read).
- `clip`: EP-aware global gradient norm / clipping across mixed meshes.
- `strategy`: `ExpertParallelStrategy(ModelParallelStrategy)` building that mesh (YAML: ep_size, replicate), with
  DCP checkpoints of the global views.
"""
