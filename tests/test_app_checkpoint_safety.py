"""What `--ckpt_path` may load, and which file the CLI checks:

- a distributed checkpoint directory whose `.metadata` pickle calls `os.system` is refused (exit 2, naming the
  file and the global) by the CLI before anything is built, and by the strategy's own load for users without the
  CLI; the marker file the payload would create never appears. Torch's reader runs it (the negative control);
- a real DCP checkpoint (model tensors of several dtypes, AdamW state and param groups: what the strategy writes)
  passes the restricted reader, which returns exactly what torch's reader returns, and loads back bit for bit;
  a non-tensor item with code in it (.distcp) is refused by the safe planner, which torch's default one runs;
- a missing `--ckpt_path`, a directory that is no checkpoint, a DCP directory in a one-process run and a
  `--model.pretrained` that is neither a directory nor a hub id exit 2 naming the path and what was expected;
- after two fresh fits into one directory (`last.ckpt`, then `last-v1.ckpt`), `--ckpt_path last` is checked
  against the file Lightning loads (the newest), and that file is the one loaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_app_common import small_data  # noqa: F401  (fixture)

import cli
from qmoe_lightning.parallel.checkpoint_safety import (SafeFileSystemReader, UnsafeCheckpointError, read_dcp_metadata,
                                              safe_dcp_load)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY, TINY_EP = str(CONFIGS / "tiny.yaml"), str(CONFIGS / "tiny_ep.yaml")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


def _exit_code(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


class _Touch:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_dcp_dir(root: Path, marker: Path) -> Path:
    root.mkdir(parents=True)
    torch.save({"hyper_parameters": {}}, root / "meta.pt")
    (root / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    return root


def _real_dcp_dir(root: Path) -> tuple[Path, dict]:
    """A DCP checkpoint laid out as the strategy writes one: `state_dict.*` tensors, `optimizer_0` state (tensors)
    and param groups (non-tensor items), plus Lightning's meta.pt."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].to(torch.bfloat16)
    model.register_buffer("steps", torch.arange(5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model[0](torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "optimizer_0": {"state": {f"p{i}": {k: v.clone() for k, v in s.items()}
                                       for i, s in enumerate(opt.state.values())},
                             "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                               "params": [f"p{i}" for i in range(len(g["params"]))]}
                                              for g in opt.param_groups]}}
    dcp.save(state, checkpoint_id=root, no_dist=True)
    torch.save({"hyper_parameters": {}, "global_step": 1}, root / "meta.pt")
    return root, state


def test_crafted_dcp_metadata_is_refused_before_anything_runs(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = _crafted_dcp_dir(tmp_path / "evil.ckpt", marker)
    code, text = _exit_code(["fit", "--config", TINY_EP, "--trainer.default_root_dir", str(tmp_path / "run"),
                             "--ckpt_path", str(evil)], capsys)
    assert code == 2 and f"--ckpt_path {evil}: {evil / '.metadata'} refers to posix.system" in text, text
    assert not marker.exists()
    assert not (tmp_path / "run" / ".qmoe_run.lock").exists()  # and the run directory's lock was given back

    # the strategy's own load (Trainer.fit(ckpt_path=...) without the CLI) and the safe reader refuse it too
    from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

    for load in (lambda: ExpertParallelStrategy().load_checkpoint(evil), lambda: read_dcp_metadata(evil),
                 lambda: SafeFileSystemReader(str(evil)).read_metadata(),
                 lambda: safe_dcp_load({"state_dict": {"w": torch.zeros(1)}}, evil)):
        with pytest.raises(UnsafeCheckpointError, match="posix.system"):
            load()
    assert not marker.exists()
    # negative control: torch's own reader runs the payload
    try:
        dcp.FileSystemReader(str(evil)).read_metadata()
    except Exception:  # os.system returns an int, which the reader then fails on
        pass
    assert marker.exists()


def test_a_dotted_name_under_an_allowed_module_is_refused(tmp_path):
    class Method:
        def __reduce__(self):
            return Path.touch, (tmp_path / "touched",)  # pickled as pathlib.Path.touch

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".metadata").write_bytes(pickle.dumps(Method(), protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="pathlib.Path.touch"):
        read_dcp_metadata(tmp_path / "d")
    assert not (tmp_path / "touched").exists()


def test_real_dcp_checkpoint_reads_as_torch_reads_it_and_loads_back(tmp_path):
    path, saved = _real_dcp_dir(tmp_path / "last.ckpt")
    ours = read_dcp_metadata(path)
    theirs = dcp.FileSystemReader(str(path)).read_metadata()
    assert theirs.storage_meta.load_id is not None
    theirs.storage_meta.load_id = None  # a fresh id per reader
    assert ours == theirs
    assert {type(m).__name__ for m in ours.state_dict_metadata.values()} == {"TensorStorageMetadata",
                                                                             "BytesStorageMetadata"}
    via_reader = SafeFileSystemReader(str(path)).read_metadata()
    via_reader.storage_meta.load_id = None
    assert via_reader == theirs

    target = {"state_dict": {k: torch.zeros_like(v) for k, v in saved["state_dict"].items()},
              "optimizer_0": {"state": {p: {k: torch.zeros_like(v) for k, v in s.items()}
                                        for p, s in saved["optimizer_0"]["state"].items()},
                              "param_groups": [{k: None for k in g} for g in saved["optimizer_0"]["param_groups"]]}}
    safe_dcp_load(target, path)
    for k, v in saved["state_dict"].items():
        assert target["state_dict"][k].dtype == v.dtype and torch.equal(target["state_dict"][k], v), k
    for p, s in saved["optimizer_0"]["state"].items():
        for k, v in s.items():
            assert torch.equal(target["optimizer_0"]["state"][p][k], v), (p, k)
    assert target["optimizer_0"]["param_groups"] == saved["optimizer_0"]["param_groups"]


def test_code_in_a_non_tensor_item_is_refused_by_the_safe_planner(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "ck"
    dcp.save({"extra": {"payload": _Touch(marker)}}, checkpoint_id=path, no_dist=True)
    assert read_dcp_metadata(path) is not None  # the metadata itself is plain: the code is in the .distcp file
    with pytest.raises(UnsafeCheckpointError, match=r"item 'extra.payload' is not plain data .*posix.system"):
        safe_dcp_load({"extra": {"payload": None}}, path)
    assert not marker.exists()
    dcp.load({"extra": {"payload": None}}, checkpoint_id=path, no_dist=True)  # torch's default planner runs it
    assert marker.exists()


def test_dcp_checkpoint_in_a_one_process_run_is_refused_naming_it(tmp_path, capsys):
    path, _ = _real_dcp_dir(tmp_path / "last.ckpt")
    code, text = _exit_code(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"),
                             "--ckpt_path", str(path)], capsys)
    assert code == 2 and f"--ckpt_path {path} is a distributed checkpoint directory" in text, text
    assert "SingleDeviceStrategy" in text and "config.yaml" in text


@pytest.mark.parametrize("strategy", ["ModelParallelStrategy", "FSDPStrategy"])
def test_dcp_checkpoint_under_a_lightning_sharded_strategy_is_refused(tmp_path, capsys, strategy):
    """Lightning's own sharded strategies load a DCP directory through torch's default planner, which unpickles its
    non-tensor items with weights_only=False: only ExpertParallelStrategy (which loads through checkpoint_safety)
    is given one."""
    import lightning.pytorch.strategies as strategies

    import cli

    path, _ = _real_dcp_dir(tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as stop:
        cli._checkpoint_hparams(path, strategy=getattr(strategies, strategy)())
    text = capsys.readouterr().err
    assert stop.value.code == 2 and f"--ckpt_path {path} is a distributed checkpoint directory" in text, text
    assert strategy in text and "ExpertParallelStrategy" in text


@pytest.mark.parametrize("kind", ["missing", "plain directory"])
def test_ckpt_path_that_is_no_checkpoint_is_refused_naming_it(tmp_path, capsys, kind):
    path = tmp_path / "nothing.ckpt"
    if kind == "plain directory":
        path.mkdir()
    for sub in ("fit", "predict"):
        code, text = _exit_code([sub, "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"),
                                 "--ckpt_path", str(path)], capsys)
        assert code == 2 and f"--ckpt_path {path}" in text, text
        assert ("no such file or directory" if kind == "missing" else "directory without .metadata") in text
        assert "expected a .ckpt file or a distributed checkpoint directory" in text


@pytest.mark.parametrize("value, why", [("/nonexistent/model_dir", "is neither a local directory"),
                                        ("no_such_model", "is neither a local directory"),
                                        (__file__, "is a file")])
def test_pretrained_that_is_neither_a_directory_nor_a_hub_id_is_refused(tmp_path, capsys, value, why):
    code, text = _exit_code(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"),
                             "--model.pretrained", value], capsys)
    assert code == 2 and f"--model.pretrained {value} {why}" in text, text
    assert "hub model id ('org/name')" in text
    from qmoe_lightning.models.checkpoint import resolve_checkpoint_dir

    if why != "is a file":  # the library's own message (users of QMoELightningModule without the CLI)
        with pytest.raises(FileNotFoundError, match="neither a local directory .* nor a hub model id"):
            resolve_checkpoint_dir(value)


@pytest.mark.slow
def test_resume_last_checks_the_checkpoint_lightning_loads(tmp_path, small_data, capsys):
    root = tmp_path / "run"
    args = ["fit", "--config", TINY, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--data.train_path", str(small_data), "--data.val_path",
            str(small_data), "--data.max_tokens", "128", "--data.num_workers", "0", "--data.cache_dir",
            str(tmp_path / "cache")]
    cli.main([*args, "--model.lr", "0.001"])
    cli.main([*args, "--model.lr", "0.002"])  # a second fresh fit: Lightning keeps the first's last.ckpt
    ckpt = root / "checkpoints"
    assert (ckpt / "last.ckpt").is_file() and (ckpt / "last-v1.ckpt").is_file()
    newest = ckpt / "last-v1.ckpt"
    # the first run's settings differ from the newest checkpoint's, which is what Lightning would load
    code, text = _exit_code([*args, "--trainer.max_steps", "2", "--ckpt_path", "last", "--model.lr", "0.001"],
                            capsys)
    assert code == 2 and f"resuming from {newest}" in text and "model.lr: 0.001 here, 0.002 in the checkpoint" in text
    # the newest run's settings resume, from that very file
    app = cli.main([*args, "--trainer.max_steps", "2", "--ckpt_path", "last", "--model.lr", "0.002"])
    assert app.trainer.ckpt_path == str(newest) and app.trainer.global_step == 2
