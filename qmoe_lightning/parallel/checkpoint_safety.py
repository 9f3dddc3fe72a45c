"""Reading distributed checkpoints (DCP directories) without running code that came with them.

torch's `FileSystemReader.read_metadata` unpickles `<dir>/.metadata` with a plain `pickle.load`, and its
`DefaultLoadPlanner.load_bytes` reads every non-tensor item (optimizer hyperparameters, ...) with
`torch.load(..., weights_only=False)`: a checkpoint directory from anywhere could run any code on load. Here:

- `read_dcp_metadata(path)`: `.metadata` through an unpickler that only resolves the globals a real one refers to
  (listed by disassembling the metadata of this project's checkpoints, torch 2.13): the dataclasses and the enum of
  `torch.distributed.checkpoint.metadata`, `filesystem._StorageInfo`, `torch.Size`, torch dtypes / layouts /
  memory formats (the layout through `torch.serialization._get_layout`, a lookup by name), and `pathlib` paths
  (`StorageMeta.checkpoint_id`; building one touches no file). Anything else -- `os.system`, `builtins.eval`, any
  other class -- is refused with `UnsafeCheckpointError` naming the file and the global, before it is resolved;
- `SafeFileSystemReader` / `SafeLoadPlanner`: the reader and planner to hand `torch.distributed.checkpoint.load`
  (`safe_dcp_load`): the same metadata check, and the non-tensor items read with `weights_only=True` (a real
  checkpoint's are floats, strings, tuples, lists and tensors).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

METADATA_FILE = ".metadata"  # torch.distributed.checkpoint.filesystem's name for it


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file refers to code that a checkpoint of this kind never needs."""


def _dcp_metadata_globals() -> dict[tuple[str, str], object]:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    allowed: dict[tuple[str, str], object] = {}
    for name, obj in vars(dcp_metadata).items():
        if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__ and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            allowed[(dcp_metadata.__name__, name)] = obj
    allowed[(_StorageInfo.__module__, _StorageInfo.__name__)] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name, obj in vars(torch).items():  # values, never called: torch.float32, torch.strided, ...
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # name -> torch.layout
    import pathlib

    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    return allowed


_ALLOWED: dict[tuple[str, str], object] | None = None


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, name: str):
        super().__init__(file)
        self._name = name

    def find_class(self, module: str, name: str):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _dcp_metadata_globals()
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self._name} refers to {module}.{name}, which distributed checkpoint metadata never contains "
                "(it holds torch.distributed.checkpoint.metadata classes, torch sizes / dtypes and paths only): "
                "refusing to load it, since unpickling it could run code that came with the file")
        return obj

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._name}: unexpected persistent id {pid!r} in distributed checkpoint "
                                    "metadata")


def load_dcp_metadata(stream, name: str) -> dcp_metadata.Metadata:
    """The `Metadata` pickled in `stream` (a binary file), resolving only the allowed globals (see the module)."""
    metadata = _DCPMetadataUnpickler(stream, str(name)).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{name} holds a {type(metadata).__name__}, not distributed checkpoint Metadata")
    return metadata


def read_dcp_metadata(path: str | Path) -> dcp_metadata.Metadata:
    """The metadata of the DCP directory `path` (`UnsafeCheckpointError` for a crafted one, see the module)."""
    file = Path(path) / METADATA_FILE
    with open(file, "rb") as f:
        return load_dcp_metadata(f, str(file))


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` whose `read_metadata` resolves only the globals real DCP metadata refers to."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"  # the parent's per-rank file name
        path = self.fs.concat_path(self.path, name)
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_dcp_metadata(f, str(path))
        # what the parent does after reading: the load id travels with the metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` reading the checkpoint's non-tensor items with `torch.load(weights_only=True)` (the
    parent uses weights_only=False: any code pickled into a .distcp file would run)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:  # torch's message: a preamble, the reason, a pointer to the docs
            lines = [line for line in str(err).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1:] or [""])
            raise UnsafeCheckpointError(f"the checkpoint's item {read_item.dest_index.fqn!r} is not plain data "
                                        f"(refused by torch.load(weights_only=True): {''.join(reason)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state_dict: dict, path: str | Path) -> None:
    """`torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)` (in place) with the safe reader and
    planner: the same collective calls on every rank, the same defaults otherwise. The metadata is checked first,
    so a crafted file fails here with `UnsafeCheckpointError` rather than inside torch's CheckpointException."""
    if (Path(path) / METADATA_FILE).is_file():
        read_dcp_metadata(path)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as err:  # torch gathers every rank's failure: a refusal is raised as itself
        for exc, _ in err.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{path}: {exc}") from None
        raise
