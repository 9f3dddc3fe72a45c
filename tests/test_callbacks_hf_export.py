"""HFExport: a short fit writes `<default_root_dir>/hf_export`, which transformers loads and which reproduces the
trained native model's logits; the export is atomic; the hub push goes through a (mocked) HfApi with retries and a
failed push keeps the local export."""

from __future__ import annotations

import logging

import pytest
import torch
from test_app_common import make_datamodule, make_trainer, small_data  # noqa: F401  (fixture)

from callbacks import HFExport
from qmoe_lightning.hub import push_folder_to_hub
from qmoe_lightning.lightning_module import QMoELightningModule


@pytest.fixture
def trained(tmp_path, small_data):
    module = QMoELightningModule(pretrained="embedded", lr=5e-3)
    export = HFExport()
    dm = make_datamodule(small_data, tmp_path / "cache", max_tokens=128)
    trainer = make_trainer(tmp_path / "run", max_steps=2, callbacks=[export])
    trainer.fit(module, datamodule=dm)
    return module, export, dm


def test_export_loads_in_transformers_with_same_logits(trained, tmp_path):
    from transformers import AutoModelForImageTextToText

    module, export, dm = trained
    out_dir = tmp_path / "run" / "hf_export"
    assert export.last_export == out_dir and (out_dir / "config.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json"):
        assert (out_dir / name).is_file(), name
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".hf_export")]  # no temp dirs left

    hf = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32).eval()
    hf.config.text_config._experts_implementation = "eager"
    batch = dm.val_dataset[0]
    assert batch["pixel_values"] is not None  # an image is in the comparison
    # one document at a time (transformers' torch path does not separate packed documents)
    cu = batch["cu_seqlens"].tolist()
    types = batch["mm_token_type_ids"][0]
    for s, e in zip(cu[:-1], cu[1:]):  # the first document with an image: it holds the row's first image
        if bool((types[s:e] == 1).any()):
            break
    image_idx = 0
    grids = batch["image_grid_thw"]
    offset = int(grids[:image_idx].prod(-1).sum())
    doc = {
        "input_ids": batch["input_ids"][:, s:e],
        "mm_token_type_ids": batch["mm_token_type_ids"][:, s:e],
        "image_grid_thw": grids[image_idx:image_idx + 1],
        "pixel_values": batch["pixel_values"][offset: offset + int(grids[image_idx].prod())],
    }
    module.model.eval()
    with torch.no_grad():
        ours = module.model(**doc).logits
        theirs = hf(**doc).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # the trained weights were exported, not the initial ones
    fresh = QMoELightningModule(pretrained="embedded")
    fresh.configure_model()
    with torch.no_grad():
        assert not torch.allclose(fresh.model(**doc).logits, ours, atol=1e-4)


def test_export_processor_loads(trained, tmp_path):
    out_dir = tmp_path / "run" / "hf_export"
    try:
        import torchvision  # noqa: F401  (transformers' Qwen3-VL video processor needs it)
    except ImportError:
        torchvision = None
    if torchvision is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(out_dir)
    else:
        # same files, same classes, built without the video sub-processor (what the data module uses)
        from data_modules.processor import load_processor

        processor = load_processor.__wrapped__(str(out_dir))
    from data_modules.processor import load_processor

    source = load_processor.__wrapped__(str(trained[0].checkpoint_source.directory))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What color is the shape?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == source.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert processor.tokenizer(text)["input_ids"] == source.tokenizer(text)["input_ids"]


def test_export_is_atomic_when_writing_fails(trained, tmp_path, monkeypatch):
    module, export, _ = trained
    out_dir = tmp_path / "run" / "hf_export"
    before = {p.name: p.stat().st_size for p in out_dir.iterdir()}
    import qmoe_lightning.models.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        module.model.save_pretrained(out_dir)
    assert {p.name: p.stat().st_size for p in out_dir.iterdir()} == before  # previous export untouched
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".hf_export")]


class FakeApi:
    def __init__(self, fail_times: int):
        self.fail_times = fail_times
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("hub unreachable (simulated)")
        return type("Commit", (), {"commit_url": f"https://hf.co/{kwargs['repo_id']}/commit/abc"})()


def test_hub_push_retries_then_succeeds_with_env_token(tmp_path, monkeypatch):
    (tmp_path / "x.json").write_text("{}")
    monkeypatch.setenv("MY_TOKEN", "hf_secret")
    api, sleeps = FakeApi(fail_times=2), []
    result = push_folder_to_hub(tmp_path, "org/model", private=True, token_env="MY_TOKEN", retries=3,
                                backoff_s=1.0, api=api, sleep=sleeps.append)
    assert result.ok and result.attempts == 3 and result.url.endswith("/commit/abc")
    assert sleeps == [1.0, 2.0]  # exponential backoff
    uploads = [kw for name, kw in api.calls if name == "upload_folder"]
    assert len(uploads) == 3 and all(kw["token"] == "hf_secret" for kw in uploads)
    assert uploads[0]["folder_path"] == str(tmp_path) and uploads[0]["repo_id"] == "org/model"
    assert uploads[0]["ignore_patterns"] == [".qmoe_export"]  # our marker is not part of the model
    creates = [kw for name, kw in api.calls if name == "create_repo"]
    assert creates[0]["private"] is True and creates[0]["exist_ok"] is True


def test_hub_push_failure_is_reported_and_local_export_kept(trained, tmp_path, monkeypatch, caplog):
    module, export, _ = trained
    api = FakeApi(fail_times=10)
    import qmoe_lightning.hub as hub

    calls = {}

    def fake_push(folder, repo_id, **kwargs):
        calls["folder"] = folder
        return push_folder_to_hub(folder, repo_id, api=api, sleep=lambda s: None, **kwargs)

    monkeypatch.setattr("callbacks.hf_export.push_folder_to_hub", fake_push)
    assert hub.push_folder_to_hub is push_folder_to_hub
    export.repo_id, export.push_retries = "org/model", 2
    trainer = module.trainer
    with caplog.at_level(logging.ERROR):
        export.export(trainer, module, push=True)  # must not raise
    assert export.last_push is not None and not export.last_push.ok and export.last_push.attempts == 2
    assert "hub unreachable" in export.last_push.error
    assert any("failed after 2 attempt" in r.message for r in caplog.records)
    # the hint is a command that exists with today's huggingface_hub (`huggingface-cli` is gone in 1.x)
    assert any("`hf upload org/model " in r.message for r in caplog.records)
    assert not any("huggingface-cli" in r.message for r in caplog.records)
    out_dir = tmp_path / "run" / "hf_export"
    assert calls["folder"] == out_dir and (out_dir / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in out_dir.iterdir())
