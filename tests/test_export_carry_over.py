"""What a user adds to an export directory survives the next export into it (qmoe_lightning.export_dir.carry_over):
a model card, a nested folder, a hand-edited file of ours (kept as NAME.user), on both swap paths and whatever step
of the swap a crash stops at; files of ours that the new export no longer writes (stale shards) are not carried."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from qmoe_lightning import export_dir
from qmoe_lightning.export_dir import MARKER, recover, swap_into_place, temp_dir


def _export(out: Path, files: dict[str, str], kind: str = "hf_model") -> Path:
    """Write `files` as an export of ours into `out` through the real swap."""
    tmp = temp_dir(out)
    tmp.mkdir(parents=True)
    for name, text in files.items():
        (tmp / name).write_text(text)
    swap_into_place(tmp, out, kind)
    return out


def _user_files(out: Path) -> None:
    (out / "README.md").write_text("# my model card")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text('{"acc": 0.9}')


def _can_exchange(tmp_path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir()
    b.mkdir()
    return export_dir._exchange(a, b)


@pytest.fixture(params=["exchange", "two_renames"])
def swap_path(request, tmp_path, monkeypatch):
    if request.param == "exchange":
        if not _can_exchange(tmp_path):
            pytest.skip("this file system cannot exchange directories atomically")
    else:
        monkeypatch.setattr(export_dir, "_exchange", lambda a, b: False)
    return request.param


def test_user_files_survive_a_second_export_and_are_logged(tmp_path, swap_path, caplog):
    out = _export(tmp_path / "hf_export", {"config.json": "v1", "model-00001-of-00002.safetensors": "a",
                                           "model-00002-of-00002.safetensors": "b"})
    marker = json.loads((out / MARKER).read_text())
    assert set(marker["files"]) == {"config.json", "model-00001-of-00002.safetensors",
                                    "model-00002-of-00002.safetensors"}
    _user_files(out)
    with caplog.at_level(logging.INFO):
        _export(out, {"config.json": "v2", "model.safetensors": "ab"})  # now one shard
    assert (out / "README.md").read_text() == "# my model card"
    assert (out / "eval" / "scores.json").read_text() == '{"acc": 0.9}'
    assert (out / "config.json").read_text() == "v2" and (out / "model.safetensors").read_text() == "ab"
    assert not list(out.glob("model-0000*"))  # the old export's shards are ours: not carried
    assert set(json.loads((out / MARKER).read_text())["files"]) == {"config.json", "model.safetensors"}
    log = caplog.text
    assert "README.md" in log and "eval/" in log and "model-00001" not in log
    # a third export still keeps them (they are not in the marker's list of ours)
    _export(out, {"config.json": "v3", "model.safetensors": "abc"})
    assert (out / "README.md").read_text() == "# my model card" and (out / "eval" / "scores.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf_export")] == []


def test_hand_edited_file_of_ours_is_kept_beside_the_new_one(tmp_path, caplog):
    out = _export(tmp_path / "hf_export", {"config.json": "v1", "generation_config.json": "g1",
                                           "model.safetensors": "w"})
    (out / "generation_config.json").write_text("g1 edited by hand")
    (out / "chat_template.jinja").write_text("user's template")  # a name the next export writes too
    with caplog.at_level(logging.WARNING):
        _export(out, {"config.json": "v2", "generation_config.json": "g2", "chat_template.jinja": "ours",
                      "model.safetensors": "w2"})
    assert (out / "generation_config.json").read_text() == "g2"
    assert (out / "generation_config.json.user").read_text() == "g1 edited by hand"
    assert (out / "chat_template.jinja").read_text() == "ours"
    assert (out / "chat_template.jinja.user").read_text() == "user's template"
    assert "generation_config.json.user" in caplog.text and "chat_template.jinja.user" in caplog.text
    # unchanged files of ours are replaced silently, nothing else is kept
    assert sorted(p.name for p in out.iterdir()) == sorted([
        MARKER, "config.json", "generation_config.json", "generation_config.json.user", "chat_template.jinja",
        "chat_template.jinja.user", "model.safetensors"])


def test_marker_without_file_list_counts_the_export_file_kinds_as_ours(tmp_path):
    out = tmp_path / "hf_export"  # an export written before markers listed their files
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"written_by": "qmoe_lightning", "kind": "hf_model"}))
    for name in ("config.json", "tokenizer.json", "model-00001-of-00003.safetensors",
                 "model-00003-of-00003.safetensors", "model.safetensors.index.json", "adapter_config.json"):
        (out / name).write_text("old")
    _user_files(out)
    (out / "notes.txt").write_text("mine")
    _export(out, {"config.json": "new", "model.safetensors": "w"})
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "config.json", "model.safetensors",
                                                            "README.md", "eval", "notes.txt"])


def test_carried_files_are_links_or_copies_and_keep_their_modes(tmp_path):
    out = _export(tmp_path / "hf_export", {"config.json": "v1"})
    (out / "big.bin").write_bytes(b"x" * 1000)
    os.chmod(out / "big.bin", 0o600)
    (out / "link").symlink_to("big.bin")
    _export(out, {"config.json": "v2"})
    assert (out / "big.bin").read_bytes() == b"x" * 1000 and (out / "big.bin").stat().st_mode & 0o777 == 0o600
    assert (out / "link").is_symlink() and os.readlink(out / "link") == "big.bin"


class _Killed(BaseException):
    """Stands for kill -9 at a step of the swap: swap_into_place has no cleanup, so the disk is left as a kill
    leaves it (the caller's cleanup of its temporary is not run here either)."""


@pytest.mark.parametrize("exchange,step", [(True, "written"), (True, "exchanged"), (True, "cleaned"),
                                           (False, "written"), (False, "parked"), (False, "placed"),
                                           (False, "cleaned")])
def test_user_file_survives_a_kill_at_each_step_of_the_swap(tmp_path, monkeypatch, exchange, step):
    if exchange and not _can_exchange(tmp_path):
        pytest.skip("this file system cannot exchange directories atomically")
    out = _export(tmp_path / "hf_export", {"config.json": "v1", "model.safetensors": "w1"})
    _user_files(out)
    if not exchange:
        monkeypatch.setattr(export_dir, "_exchange", lambda a, b: False)

    def die(s):
        if s == step:
            raise _Killed(s)

    monkeypatch.setattr(export_dir, "_after", die)
    with pytest.raises(_Killed):
        _export(out, {"config.json": "v2", "model.safetensors": "w2"})
    monkeypatch.setattr(export_dir, "_after", lambda s: None)
    # the process is gone: its temporaries now carry the pid of a dead process, as after a real kill
    pid = f"-{export_dir._host()}-{os.getpid()}"
    for p in tmp_path.iterdir():
        if p.name.startswith(".hf_export.") and p.name.endswith(pid):
            p.rename(p.with_name(p.name[: -len(pid)] + f"-{export_dir._host()}-999999999"))
    if (exchange, step) != (False, "parked"):  # the one instant without a final directory (restored by recover)
        assert (out / "README.md").read_text() == "# my model card"
    recover(out)
    assert (out / "README.md").read_text() == "# my model card"
    assert (out / "eval" / "scores.json").read_text() == '{"acc": 0.9}'
    assert (out / "config.json").read_text() == ("v2" if step in ("exchanged", "placed", "cleaned") else "v1")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf_export")] == []
    _export(out, {"config.json": "v3", "model.safetensors": "w3"})  # and the next export keeps them
    assert (out / "README.md").read_text() == "# my model card" and (out / "config.json").read_text() == "v3"


def test_peft_adapter_export_keeps_a_model_card(tmp_path):
    """Through the real adapter writer: a README.md beside adapter_model.safetensors survives the next export."""
    import torch

    from qmoe_lightning.lora import LoraConfig, apply_lora, save_peft_adapter
    from qmoe_lightning.embedded import ensure_embedded_default
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(ensure_embedded_default().model_dir))
    apply_lora(model, LoraConfig(rank=2))
    out = save_peft_adapter(model, tmp_path / "hf_adapter", "base")
    (out / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    save_peft_adapter(model, out, "base")
    assert (out / "README.md").read_text().startswith("---")
    assert set(json.loads((out / MARKER).read_text())["files"]) == {"adapter_model.safetensors",
                                                                   "adapter_config.json"}
