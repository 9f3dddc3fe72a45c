"""cli.py as a user drives it: --help from docstrings, --print_config, parse-time errors naming the bad key or value,
a missing data file failing before any model is built, and a short end-to-end fit (checkpoints, config beside them,
HF export, heatmap) that can be re-run into the same directory and validated from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app_common import small_data  # noqa: F401  (fixture)

import cli

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])  # pytest's own arguments are not the CLI's


def _run_cli_expecting_exit(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def test_help_is_documented_from_docstrings(capsys):
    code, text = _run_cli_expecting_exit(["fit", "--help"], capsys)
    assert code == 0
    assert "--model.lr" in text and "peak AdamW learning rate" in text
    assert "--model.freeze_router" in text and "--data.train_path" in text
    assert "--trainer.max_steps" in text


def test_print_config_resolves_tiny_yaml(capsys):
    code, text = _run_cli_expecting_exit(["fit", "--config", TINY, "--model.lr", "0.01", "--print_config"], capsys)
    assert code == 0
    assert "lr: 0.01" in text and "pretrained: embedded" in text and "class_path: callbacks.HFExport" in text


@pytest.mark.parametrize("args, needle", [
    (["--model.lrr", "0.1"], "lrr"),  # unknown key on the command line
    (["--model.lr", "fast"], "lr"),  # wrong type
    (["--trainer.max_steps", "ten"], "max_steps"),
    (["--data.max_tokens", "1.5"], "max_tokens"),
])
def test_bad_arguments_fail_at_parse_time_naming_them(args, needle, capsys):
    code, text = _run_cli_expecting_exit(["fit", "--config", TINY, *args], capsys)
    assert code != 0 and needle in text


def test_unknown_key_in_yaml_fails_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("  warmup_steps: 10", "  warmup_steps: 10\n  warmup_stepz: 4"))
    code, text = _run_cli_expecting_exit(["fit", "--config", str(bad)], capsys)
    assert code != 0 and "warmup_stepz" in text


def test_missing_data_file_fails_before_the_model_is_built(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    app = cli.main(["--config", TINY, "--data.train_path", str(missing), "--data.val_path", "null",
                    "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    with pytest.raises((FileNotFoundError, ValueError), match="train.jsonl"):
        app.trainer.fit(app.model, datamodule=app.datamodule)
    assert app.model.model is None  # failed while preparing data: nothing built, no step taken
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_tiny_fit_end_to_end_rerun_and_validate(tmp_path, small_data):
    root = tmp_path / "run"
    args = ["fit", "--config", TINY, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--data.train_path", str(small_data), "--data.val_path", str(small_data), "--data.max_tokens", "128",
            "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")]
    app = cli.main(args)
    assert app.trainer.global_step == 2
    ckpt = root / "checkpoints"
    assert (ckpt / "last.ckpt").is_file() and (ckpt / "config.yaml").is_file()
    assert "max_steps: 2" in (ckpt / "config.yaml").read_text()
    assert (root / "hf_export" / "config.json").is_file()
    assert any((root / "expert_load").glob("*.png"))
    from PIL import Image

    with Image.open(root / "run_summary.png") as im:  # the run at a glance (callbacks.RunSummaryPlot)
        assert im.text["Title"] == "run summary: 2 optimizer steps"
    from callbacks import RunReport

    start = RunReport.start_block(app.trainer, app.model)
    assert "Qwen3_5MoeForConditionalGeneration from embedded" in start and "routed experts" in start
    assert "precision 32-true" in start and "train data: 24 samples" in start
    end = RunReport.end_block(app.trainer)
    for where in ("checkpoints", "HF export", "heatmaps", "summary", "config", "logs"):
        assert where in end, (where, end)
    assert str(root / "hf_export") in end and "last.ckpt" in end
    bar = cli.main([a for a in args[1:] if a not in ("--trainer.enable_progress_bar", "false")], run=False).trainer
    progress = bar.progress_bar_callback
    assert type(progress).__name__ == "StepProgressBar" and bar.max_epochs in (None, -1)
    progress._trainer = bar  # what Lightning sets at setup
    assert progress._get_train_description(2).strip() == "Epoch 2"  # Lightning's rich bar said "Epoch 2/-2"
    metrics = app.trainer.callback_metrics
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/image_acc",
            "moe/aux_loss"} <= set(metrics)

    # same command into the same directory: must not fail on the existing config / checkpoints
    app2 = cli.main(args)
    assert app2.trainer.global_step == 2
    assert len(list(ckpt.glob("config-*.yaml"))) == 2

    # validate from the checkpoint
    val = cli.main(["validate", "--config", TINY, "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "false", "--data.train_path", str(small_data),
                    "--data.val_path", str(small_data), "--data.max_tokens", "128", "--data.num_workers", "0",
                    "--data.cache_dir", str(tmp_path / "cache"), "--ckpt_path", str(ckpt / "last.ckpt")])
    assert "val/loss" in val.trainer.callback_metrics


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(TINY).parent).glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    code, text = _run_cli_expecting_exit(["fit", "--config", str(Path(TINY).parent / config), "--print_config"],
                                         capsys)
    assert code == 0 and "model:" in text and "data:" in text


@pytest.mark.slow
def test_resume_with_a_different_model_setting_stops_and_says_how(tmp_path, small_data, capsys):
    root = tmp_path / "run"
    args = ["fit", "--config", TINY, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--data.train_path", str(small_data), "--data.val_path", str(small_data), "--data.max_tokens", "128",
            "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")]
    cli.main(args)
    ckpt = str(root / "checkpoints" / "last.ckpt")
    for where in (ckpt, "last"):
        code, text = _run_cli_expecting_exit([*args, "--trainer.max_steps", "3", "--ckpt_path", where,
                                              "--model.lr", "0.5"], capsys)
        assert code == 2 and "model.lr: 0.5 here, 0.003 in the checkpoint" in text and "--model.pretrained" in text
    # the same settings resume (and go on to step 3)
    app = cli.main([*args, "--trainer.max_steps", "3", "--ckpt_path", ckpt])
    assert app.trainer.global_step == 3


def test_data_follows_the_model_and_a_foreign_tokenizer_is_refused(tmp_path, small_data):
    import shutil

    from qmoe_lightning.embedded import ensure_embedded_default

    # a "real" model of our own: the embedded one in another directory
    other = tmp_path / "other_model"
    shutil.copytree(ensure_embedded_default().model_dir, other)
    base = ["--config", TINY, "--model.pretrained", str(other), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--data.train_path", str(small_data),
            "--data.val_path", str(small_data), "--data.max_tokens", "128", "--data.num_workers", "0",
            "--data.cache_dir", str(tmp_path / "cache")]
    app = cli.main(base, run=False)
    assert app.datamodule.model_path == str(other)  # not the embedded tokenizer the config used to pin

    # another model's processor: a tokenizer with more tokens than the model has embedding rows
    from transformers import AutoTokenizer

    foreign = tmp_path / "foreign_processor"
    shutil.copytree(other, foreign)
    tok = AutoTokenizer.from_pretrained(foreign)
    tok.add_tokens([f"word{i}" for i in range(100)])
    tok.save_pretrained(foreign)
    app = cli.main([*base, "--data.model_path", str(foreign)], run=False)
    with pytest.raises(ValueError, match=r"foreign_processor does not fit .*tokenizer has \d+ tokens but the model"):
        app.trainer.fit(app.model, datamodule=app.datamodule)
    assert app.trainer.global_step == 0


def test_garbage_ckpt_path_names_the_file(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00\x01not a checkpoint" * 10)
    code, text = _run_cli_expecting_exit(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "r"),
                                          "--ckpt_path", str(junk)], capsys)
    assert code == 2 and f"--ckpt_path {junk}: not a readable Lightning checkpoint" in text


def test_commented_logger_block_of_the_tiny_recipe_works_when_uncommented(tmp_path, small_data):
    import re

    import yaml

    text = re.sub(r"\n  # (logger:|  - class_path: lightning\.pytorch\.loggers|    init_args:|      \w+: )",
                  lambda m: "\n  " + m.group(1), Path(TINY).read_text())
    config = yaml.safe_load(text)
    loggers = config["trainer"]["logger"]
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in loggers] == ["TensorBoardLogger", "CSVLogger", "WandbLogger"]
    config["trainer"]["logger"] = [lg for lg in loggers if "Wandb" not in lg["class_path"]]  # wandb: optional
    for lg in config["trainer"]["logger"]:
        lg["init_args"]["save_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny_loggers.yaml"
    path.write_text(yaml.safe_dump(config))
    cli.main(["fit", "--config", str(path), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
              "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
              "--data.train_path", str(small_data), "--data.val_path", str(small_data), "--data.max_tokens", "128",
              "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")])
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    assert list((tmp_path / "run" / "lightning_logs").glob("version_0/events.out.tfevents.*"))
