"""Hugging Face checkpoint I/O for the native models: streaming `from_pretrained`, atomic sharded `save_pretrained`.

Loading builds the model on the meta device, casts it (A_log / dt_bias / inv_freq stay fp32), materialises it
empty on the target device and then streams the safetensors files tensor by tensor through the state-dict adapter
into the parameters: the checkpoint is never held in memory next to the model. Loading is strict: every native
parameter must be written completely (each expert slice counted) and every checkpoint tensor must land somewhere;
the error lists what is missing / unexpected (native-only state, the routers' balancing bias, is neither). Tensors that are knowingly not loaded (mtp.*, the vision tower for a
text-only model) are counted in the `LoadReport`; mtp.* tensors are recorded there and copied through on save.

Where a model's weights came from (`CheckpointSource`: the directory whose tokenizer / processor / generation files
an export copies, and the load report) is passed to the exporters as an argument. `from_pretrained` records it in
the model's one declared field `checkpoint_source`, so that `save_pretrained` of a model used alone round-trips.

Saving writes the official fused layout into a temporary sibling directory (shards + index + config + generation
config + the source's tokenizer / processor files) and swaps it into place (`qmoe_lightning.export_dir`): only a
previous export is ever replaced, and a crash at any moment leaves the previous export (or the new one) in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..export_dir import check_finite, staged_export
from .conversion import Skip, is_native_only_key

# copied from the source checkpoint so that an export is a complete, servable model directory
COMPANION_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
)


@dataclass
class LoadReport:
    """What loading a checkpoint did."""

    loaded: int  # native tensors written
    skipped: dict[str, int] = field(default_factory=dict)  # checkpoint keys knowingly not loaded, by reason
    passthrough: dict[str, Path] = field(default_factory=dict)  # HF key -> file: mtp.*, copied through on export
    rank_local: dict[str, int] | None = None  # rank-local loading: {"read_elements", "checkpoint_elements"}
    mtp_expert_layout: str | None = None  # MTP experts as read: "per_expert" / "fused" (written back the same)
    mtp_random_init: bool = False  # the checkpoint had no mtp.*: the model's MTP module is to be initialised


@dataclass
class CheckpointSource:
    """Where a model's weights came from, as far as an export needs it."""

    directory: Path | None = None  # tokenizer / processor / generation files copied into exports
    report: LoadReport | None = None  # passthrough tensors written back on export

    @property
    def passthrough(self) -> dict[str, Path]:
        return self.report.passthrough if self.report is not None else {}


def is_hub_id(value: str | os.PathLike) -> bool:
    """Whether `value` has the form of a Hugging Face hub model id ("org/name"), i.e. could be fetched."""
    text = str(value)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory (with config.json and *.safetensors)")
    if not is_hub_id(path_or_hub_id):
        raise FileNotFoundError(f"{str(path_or_hub_id)!r} is neither a local directory (no directory "
                                f"{path.resolve()}) nor a hub model id ('org/name'); expected a Hugging Face model "
                                "directory, a hub id or 'embedded'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                             "*.txt", "*.model"]))
    except Exception as err:  # offline, no such repo, gated, network: one message that says both things tried
        raise FileNotFoundError(
            f"{path_or_hub_id!r}: there is no such local directory ({path.resolve()}), and fetching it as a hub repo "
            f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return found


def open_safetensors(file: Path):
    """`safe_open` whose errors name the file (the library's say only "Error while deserializing header")."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as err:
        raise ValueError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err}); it is damaged or "
                         "truncated (an interrupted download or copy?): fetch or export it again") from None


def read_tensor(f, file: Path, key: str, meta: bool = False) -> torch.Tensor:
    """Tensor `key` of the open file `f`; on `meta` a meta tensor of its shape (from the header, no data read)."""
    try:
        if meta:
            return torch.empty(f.get_slice(key).get_shape(), device="meta")
        return f.get_tensor(key)
    except Exception as err:
        raise ValueError(f"{file}: cannot read tensor {key!r} ({type(err).__name__}: {err}); the file is damaged or "
                         "truncated: fetch or export it again") from None


def torch_dtype_named(name) -> torch.dtype | None:
    """The torch dtype named `name` ("float32", "bfloat16"), None if torch has no dtype of that name."""
    value = getattr(torch, str(name), None)
    return value if isinstance(value, torch.dtype) else None


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype config.json declares (`dtype`; transformers maps the older `torch_dtype` onto it), top level or
    text config."""
    for c in (config, config.get_text_config()):  # a text config is its own text config: read twice, same answer
        value = c.dtype  # declared by every transformers config (None: not in config.json)
        if isinstance(value, str):
            value = torch_dtype_named(value)
        if isinstance(value, torch.dtype):
            return value
    return None


class HFCheckpointMixin:
    """`from_pretrained` / `save_pretrained` for the native model classes. Each class declares what it is:"""

    HF_ARCHITECTURE: ClassVar[str]  # transformers' class of the same model: config.json's `architectures`
    MODEL_TYPES: ClassVar[tuple[str, ...]]  # config.json model_types it loads
    TEXT_ONLY: ClassVar[bool]  # no vision tower
    STATE_DICT_ADAPTER: ClassVar[type]  # HF <-> native tensor names and layouts: (config, text_only) -> adapter
    mtp: torch.nn.Module | None  # the multi-token prediction module or None (declared by the model base)

    # set by from_pretrained (None otherwise): what save_pretrained copies through when not given a source
    checkpoint_source: CheckpointSource | None = None

    @classmethod
    def hf_architecture(cls) -> str:
        """What config.json's `architectures` must say for transformers / vLLM; a class attribute, so a subclass
        FSDP2 (or another wrapper) swaps in ("FSDPQwen3_5MoeForCausalLM") still says the model's own."""
        return cls.HF_ARCHITECTURE

    def state_dict_adapter(self):
        mtp = self.mtp
        return self.STATE_DICT_ADAPTER(self.config, text_only=self.TEXT_ONLY,
                                       mtp_layers=mtp.num_depths if mtp is not None else 0)

    @classmethod
    def from_config(cls, config, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    **model_kwargs):
        """Randomly initialised model (transformers' init), built on meta and materialised on `device`.
        model_kwargs: the class's own options (e.g. `mtp_layers`)."""
        model = cls._empty(config, dtype, device, **model_kwargs)
        model.init_weights()
        return model

    @classmethod
    def _empty(cls, config, dtype, device, **model_kwargs):
        with torch.device("meta"):
            model = cls(config, **model_kwargs)
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device)
        model.tie_weights()
        model.reset_buffers()
        return model

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = "auto",
        device: str | torch.device = "cpu", **model_kwargs,
    ):
        """dtype: "auto" (default, as transformers): the dtype config.json declares (fp32 if none); None: fp32;
        or a torch dtype. device "meta": the model's structure only; the checkpoint is still checked key by key
        and shape by shape from the file headers, but no tensor data is read. model_kwargs: the class's own options
        (e.g. `mtp_layers=1` loads and trains the checkpoint's `mtp.*` module)."""
        from .registry import load_config  # the registry imports the model classes, which import this module

        path = resolve_checkpoint_dir(path_or_hub_id)
        config = load_config(path, cls.MODEL_TYPES, cls.HF_ARCHITECTURE)
        if dtype == "auto":
            dtype = checkpoint_dtype(config)
        elif isinstance(dtype, str):
            raise ValueError(f"dtype must be 'auto', None or a torch.dtype, got {dtype!r}")
        model = cls._empty(config, dtype, device, **model_kwargs)
        model.checkpoint_source = CheckpointSource(path, load_hf_weights(model, path))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        source: CheckpointSource | None = None) -> Path:
        """source: companion files and passthrough tensors to write (default: what from_pretrained recorded)."""
        return save_hf_checkpoint(self, Path(save_directory), parse_size(max_shard_size),
                                  source=source or self.checkpoint_source)


class CheckpointScan:
    """What a pass over a checkpoint's keys did not load: keys skipped by reason, mtp keys kept for re-export (key
    -> file) and keys that map to nothing in the model. Shared by `load_hf_weights` and rank-local loading."""

    def __init__(self):
        self.skipped: Counter = Counter()
        self.passthrough: dict[str, Path] = {}
        self.unexpected: list[str] = []
        self.mtp_expert_layout: str | None = None
        self.mtp_random_init = False

    def keys(self, path: Path, adapter, targets):
        """Yield (file, open safetensors handle, key) for every checkpoint key whose native key is in `targets`;
        account for every other key here."""
        for file in safetensors_files(path):
            with open_safetensors(file) as f:
                for key in f.keys():
                    native = adapter.hf_key_to_native(key)
                    if isinstance(native, Skip):
                        self.skipped[native.reason] += 1
                        if native.reason == "mtp":
                            self.passthrough[key] = file
                    elif native not in targets:
                        self.unexpected.append(key)
                    else:
                        if key.startswith("mtp.") and ".mlp.experts." in key:
                            self.mtp_expert_layout = "fused" if key.endswith("_proj") else "per_expert"
                        yield file, f, key

    def check(self, path: Path, model_name: str, missing: list[str], mtp_missing_ok: bool = False) -> None:
        """Raise the strict-loading error listing `missing` native tensors and the unexpected checkpoint keys.
        mtp_missing_ok: a checkpoint with no `mtp.*` at all may leave the model's MTP module to a random init."""
        no_mtp = bool(missing) and all(k.startswith("mtp.") for k in missing) and not any(
            k.startswith("mtp.") for k in self.passthrough)
        if no_mtp and not self.unexpected and self.mtp_expert_layout is None:
            if mtp_missing_ok:
                self.mtp_random_init = True
                return
            raise ValueError(
                f"checkpoint {path} has no multi-token prediction tensors (mtp.*) but {model_name} was built with an "
                f"MTP module ({len(missing)} tensors missing, e.g. {missing[0]}): disable MTP (model.mtp.enabled: "
                "false) or start it from a random init (model.mtp.init: random)")
        if no_mtp and not self.unexpected:  # some MTP layers there, not all the model was built with
            raise ValueError(
                f"checkpoint {path} has fewer multi-token prediction layers than {model_name} was built with "
                f"(missing {missing[:3]}{' ...' if len(missing) > 3 else ''}): set model.mtp.num_layers to the "
                "checkpoint's mtp_num_hidden_layers")
        if missing or self.unexpected:
            raise ValueError(
                f"checkpoint {path} does not match {model_name}:\n"
                f"  missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                f"  unexpected ({len(self.unexpected)}): {self.unexpected[:20]}"
                f"{' ...' if len(self.unexpected) > 20 else ''}"
            )

    def report(self, loaded: int) -> LoadReport:
        return LoadReport(loaded, dict(self.skipped), dict(self.passthrough),
                          mtp_expert_layout=self.mtp_expert_layout, mtp_random_init=self.mtp_random_init)


def load_hf_weights(model, path: Path, mtp_missing_ok: bool = False) -> LoadReport:
    """Stream every tensor of the checkpoint at `path` into `model` (strict). Returns a load report.
    mtp_missing_ok: a checkpoint without `mtp.*` leaves the model's MTP module as it is (`report.mtp_random_init`)."""
    adapter = model.state_dict_adapter()
    # native-only state (the routers' balancing bias) is not in an HF checkpoint: strict about everything else
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_native_only_key(k)}
    if adapter.tied:
        targets.pop("lm_head.weight", None)
    written: dict[str, set] = {}
    scan = CheckpointScan()
    meta = any(t.is_meta for t in targets.values())  # a structure-only model: check the headers, read nothing
    for file, f, key in scan.keys(path, adapter, targets):
        for a in adapter.convert_single_tensor_from_hf(key, read_tensor(f, file, key, meta)):
            param = targets[a.native_key]
            dest = param.data if a.expert is None else param.data[a.expert]
            if a.cols is not None:
                dest = dest[:, a.cols]
            if tuple(dest.shape) != tuple(a.tensor.shape):
                raise ValueError(
                    f"{file.name}: {key!r} -> {a.slot} has shape {tuple(a.tensor.shape)}, the model expects "
                    f"{tuple(dest.shape)}; config and weights disagree"
                )
            with torch.no_grad():
                dest.copy_(a.tensor)
            written.setdefault(a.native_key, set()).add((a.expert, None if a.cols is None else a.cols.start))
    missing = []
    for key in targets:
        slots = written.get(key)
        if not slots:
            missing.append(key)
        elif (None, None) not in slots:  # per-expert layout: every expert's slices must be there
            E = targets[key].shape[0]
            want = {(e, c) for e in range(E) for c in ((0, adapter.intermediate) if key.endswith("gate_and_up_projs")
                                                         else (None,))}
            if not want <= slots:
                missing.append(f"{key} ({len(want - slots)} expert slice(s))")
    scan.check(path, model.hf_architecture(), missing, mtp_missing_ok)
    return scan.report(len(written))


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def full_cpu_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole tensor (gathered if it is a DTensor shard): what a checkpoint file holds."""
    t = t.detach()
    if hasattr(t, "full_tensor"):  # DTensor (FSDP2 / expert parallel)
        t = t.full_tensor()
    return t.cpu()


def save_hf_checkpoint(model, out_dir: Path, max_shard_size: int, state_dict=None,
                       source: CheckpointSource | None = None) -> Path:
    """Write `model` as an HF directory. `state_dict`: the native tensors to write (default `model.state_dict()`),
    e.g. a lazy mapping with LoRA adapters merged in; it is walked once, one tensor at a time. `source`: the
    checkpoint the weights came from (its companion files and passthrough tensors are written too); None: the
    weights only, with config.json."""
    adapter = model.state_dict_adapter()
    if source is not None and source.report is not None and source.report.mtp_expert_layout:
        adapter.mtp_expert_layout = source.report.mtp_expert_layout  # write MTP experts back as they were read
    with staged_export(out_dir, "hf_model") as (tmp, out_dir):
        shards: list[dict[str, str]] = []
        current: dict[str, torch.Tensor] = {}
        size = total = 0
        dtype_numel: Counter = Counter()

        def flush():
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append({k: name for k in current})
                current, size = {}, 0

        def add(key: str, tensor: torch.Tensor):
            nonlocal size, total
            check_finite(key, tensor, f"the export {out_dir}")  # diverged weights: the previous export stays
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_size:
                flush()
            current[key] = tensor.contiguous()
            size += nbytes
            total += nbytes

        for fqn, tensor in (model.state_dict() if state_dict is None else state_dict).items():
            for key, t in adapter.convert_single_tensor_to_hf(fqn, full_cpu_tensor(tensor)):
                dtype_numel[t.dtype] += t.numel()
                add(key, t)
        for key, file in (source.passthrough if source is not None else {}).items():
            with safe_open(file, framework="pt", device="cpu") as f:
                add(key, f.get_tensor(key))
        flush()

        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final)
            weight_map.update({k: final for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        config = model.config
        config.architectures = [model.hf_architecture()]
        mtp = model.mtp
        if mtp is not None:  # what vLLM / SGLang read to build the draft module
            config.get_text_config().mtp_num_hidden_layers = mtp.num_depths
        written_dtype = dtype_numel.most_common(1)[0][0]  # the dtype most of the written weights have
        # a text-only model's config is its text config (no vision_config): then the first two are the same object
        for c in (config, config.get_text_config(), getattr(config, "vision_config", None)):
            if c is not None:  # sub-configs loaded from a bf16 checkpoint would otherwise still say bf16
                c.dtype = written_dtype
        config.save_pretrained(tmp)
        if source is not None and source.directory is not None:
            for name in COMPANION_FILES:
                if (Path(source.directory) / name).is_file():
                    shutil.copy2(Path(source.directory) / name, tmp / name)
    return out_dir
