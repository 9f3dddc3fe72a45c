"""A hub id as the data's model (`data.model_path`, which follows `model.pretrained`): the data side reads the local
snapshot of the repo's processor files (tokenizer, chat template, preprocessor configs; not the weights), so
preparation works as for a local directory. Without it a bare "org/name" failed in os.listdir before anything was
fetched. The download is replaced by a copy of the embedded default's files (nothing is fetched in tests)."""

from __future__ import annotations

import shutil

import huggingface_hub
import pytest
from test_app_common import embedded_model_dir, make_datamodule, small_data  # noqa: F401  (fixture)

from data_modules.processor import PROCESSOR_FILES, local_model_dir


def test_hub_id_is_read_from_a_snapshot_of_its_processor_files(tmp_path, monkeypatch, small_data):  # noqa: F811
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        snap = tmp_path / "hub" / repo_id.replace("/", "--")
        if not snap.exists():
            shutil.copytree(embedded_model_dir(), snap, ignore=shutil.ignore_patterns("*.safetensors"))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dm = make_datamodule(small_data, tmp_path / "cache", model_path="Org/Model")
    dm.setup("fit")
    assert calls and all(c == ("Org/Model", PROCESSOR_FILES) for c in calls)  # the processor files, not weights
    assert dm.encoder.model_dir == str(tmp_path / "hub" / "Org--Model")
    assert len(dm.train_dataset) > 0


def test_local_paths_and_non_ids_are_left_as_given(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("nothing to fetch"))
    assert local_model_dir(str(tmp_path)) == str(tmp_path)  # a directory
    assert local_model_dir("no/such/dir") == "no/such/dir"  # not an "org/name" id: the caller's error names it
