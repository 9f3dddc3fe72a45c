"""Exports never lose anything (qmoe_lightning.export_dir): only a previous export is replaced, a process killed at
any step of the swap leaves the previous or the new export under the final name (after the next start's repair at
the latest), killed exports leave no model-sized debris, and files follow the umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qmoe_lightning import export_dir
from qmoe_lightning.export_dir import MARKER, check_export_target, recover

ROOT = Path(__file__).resolve().parents[1]


def _fake_export(path: Path, payload: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(payload)
    (path / MARKER).write_text("{}")
    return path


def test_only_previous_exports_may_be_replaced(tmp_path):
    run = tmp_path / "runs" / "tiny"
    (run / "lightning_logs").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains the run directory"):
        check_export_target(run, run)  # dirpath = the run directory
    with pytest.raises(ValueError, match="contains the run directory"):
        check_export_target(tmp_path, run)  # dirpath = "." above it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=f"refusing to replace {mine}"):
        check_export_target(mine, run)
    (tmp_path / "empty").mkdir()
    for ok in (run / "hf_export", tmp_path / "empty", _fake_export(tmp_path / "prev", "{}")):
        assert check_export_target(ok, run) == ok.resolve()


def test_fit_refuses_an_export_dir_that_is_not_an_export_before_training(tmp_path):
    from test_app_common import make_datamodule, make_trainer, write_small_dataset

    from callbacks import HFExport
    from qmoe_lightning.lightning_module import QMoELightningModule

    root = tmp_path / "run"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    data = write_small_dataset(tmp_path / "data", n_rows=6)
    module = QMoELightningModule(pretrained="embedded")
    trainer = make_trainer(root, max_steps=2, callbacks=[HFExport(dirpath=str(root))])
    with pytest.raises(ValueError, match="contains the run directory"):
        trainer.fit(module, datamodule=make_datamodule(data, tmp_path / "cache"))
    assert trainer.global_step == 0 and (root / "mine.txt").read_text() == "keep me"


KILLER = textwrap.dedent("""
    import os, sys, torch
    from qmoe_lightning import export_dir
    from qmoe_lightning.embedded import ensure_embedded_default
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration
    out, step, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(ensure_embedded_default().model_dir))
    if not exchange:
        export_dir._exchange = lambda a, b: False  # the two-rename path of systems without renameat2
    def die(s):
        if s == step:
            os._exit(9)  # like kill -9: no cleanup runs
    export_dir._after = die
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # the new export differs from the previous one
    model.save_pretrained(out)
    print("survived")
""")


@pytest.mark.parametrize("exchange,step", [(True, "written"), (True, "exchanged"), (True, "cleaned"),
                                           (False, "written"), (False, "parked"), (False, "placed"),
                                           (False, "cleaned")])
@pytest.mark.slow
def test_export_killed_at_each_step_of_the_swap(tmp_path, exchange, step):
    from safetensors.torch import load_file

    from qmoe_lightning.embedded import ensure_embedded_default
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    if exchange and not export_dir._exchange(*(_fake_export(tmp_path / n, n) for n in ("a", "b"))):
        pytest.skip("this file system cannot exchange directories atomically")
    out = tmp_path / "hf_export"
    Qwen3_5MoeForConditionalGeneration.from_pretrained(str(ensure_embedded_default().model_dir)).save_pretrained(out)
    previous = load_file(out / "model.safetensors")["lm_head.weight"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), step, "1" if exchange else "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    if (exchange, step) != (False, "parked"):  # the one instant of the two-rename path with no final directory
        assert (out / MARKER).is_file() and (out / "config.json").is_file()
    repaired = recover(out)  # what the next start does
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    weights = load_file(out / "model.safetensors")["lm_head.weight"]
    new = bool((weights - previous).abs().min() > 0.5)
    assert new or bool((weights == previous).all())  # the previous export or the new one, whole
    assert new == (step in ("exchanged", "placed", "cleaned")), (step, new)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf_export")] == []  # no debris left
    assert step != "cleaned" or not repaired


def test_recover_leaves_live_processes_and_other_hosts_alone(tmp_path):
    out = tmp_path / "hf_export"
    live = tmp_path / f".hf_export.tmp-{export_dir._host()}-{os.getpid()}"
    other = tmp_path / ".hf_export.tmp-otherhost-1"
    dead = tmp_path / f".hf_export.tmp-{export_dir._host()}-999999999"
    for d in (live, other, dead):
        d.mkdir()
    assert recover(out) == [dead]
    assert live.is_dir() and other.is_dir() and not dead.exists()


def test_exports_follow_the_umask(tmp_path):
    from qmoe_lightning.embedded import ensure_embedded_default
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(ensure_embedded_default().model_dir))
    old = os.umask(0o027)
    try:
        out = model.save_pretrained(tmp_path / "export")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}  # safetensors alone gives 0600
    json.loads((out / MARKER).read_text())


def test_embedded_cache_is_readable_by_others(tmp_path):
    from qmoe_lightning.embedded import ensure_embedded_default

    old = os.umask(0o022)
    try:
        emb = ensure_embedded_default(tmp_path / "cache")
    finally:
        os.umask(old)
    assert emb.root.stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    assert (emb.model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644
