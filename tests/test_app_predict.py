"""`cli.py predict`: prompts, the in-memory transformers model, and exact match equal to validation's.

- A prompt with a reference is the row's own training encoding up to the answer's first target token; without
  one, the chat template's generation prompt.
- The transformers model made from the native one (LoRA merged) shares its tensors and gives its logits.
- The acceptance check: after a short fit (some answers right, some wrong, several multi-token), greedy generation's
  exact match equals validation's teacher-forced exact match DOCUMENT BY DOCUMENT, and the printed accuracies equal
  val/image_acc / val/text_acc. Negative control: prompts that already hold the answer's first token (an off-by-one
  cut) must disagree.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_app_common import embedded_model_dir, small_data, write_small_dataset  # noqa: F401  (fixture)

import cli
from data_modules.encoding import IGNORE, BadSample, Encoder
from qmoe_lightning.evaluation import document_answer_correct
from qmoe_lightning.generation import GenerationOptions, Predictor, normalise_answer, transformers_model

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_prompt_is_the_training_encoding_up_to_the_answer(small_data):
    enc = Encoder(embedded_model_dir(), max_tokens=512)
    base = str(small_data.parent)
    two_turns = {"messages": [{"role": "user", "content": "Count to 2."}, {"role": "assistant", "content": "1 2"},
                              {"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"}]}
    for row in _rows(small_data)[:6] + [two_turns]:
        full = enc.encode(row, base)
        prompt = enc.encode_prompt(row, base)
        last = row["messages"][-1]["content"]
        assert prompt["reference"] == last
        # the last assistant turn's targets start right after the prompt, and run to its <|im_end|>
        k = prompt["num_tokens"]
        assert full["input_ids"][:k] == prompt["input_ids"] and full["labels"][k] != IGNORE
        assert full["labels"][k - 1] == IGNORE and prompt["labels"] == [IGNORE] * k
        tail = enc.processor.tokenizer.decode(full["input_ids"][k:])
        assert tail.startswith(last + "<|im_end|>"), tail
        # what generation must reproduce: the final turn's targets, as validation judges them
        assert prompt["reference_ids"] == [t for t in full["labels"][k:] if t != IGNORE]
        assert enc.processor.tokenizer.decode(prompt["reference_ids"]) == last + "<|im_end|>"
        assert prompt["images"] == full["images"] and prompt["image_grids"] == full["image_grids"]
    # without a final assistant turn: the generation prompt, no reference
    question = {"id": 7, "messages": two_turns["messages"][:3]}
    prompt = enc.encode_prompt(question, base)
    text = enc.processor.apply_chat_template(question["messages"], tokenize=False, add_generation_prompt=True)
    assert prompt["input_ids"] == enc.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt["reference"] is None and prompt["reference_ids"] is None and prompt["prompt_id"] == "7"
    assert text.endswith("<|im_start|>assistant\n")
    # rows a prompt cannot be made from
    with pytest.raises(BadSample, match="'messages'") as err:
        enc.encode_prompt({"text": "plain text"}, base)
    assert err.value.reason == "bad_schema"
    with pytest.raises(BadSample) as err:
        Encoder(embedded_model_dir(), max_tokens=8).encode_prompt(question, base)
    assert err.value.reason == "too_long"


def test_normalise_answer_drops_a_thinking_block():
    assert normalise_answer("<think>\nhm\n</think>\n\n red ") == "red"
    assert normalise_answer("hm, reasoning\n</think>\n\nred") == "red"  # the prompt opened <think>
    assert normalise_answer(" red ") == "red"
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(temperature=-1.0)


class _FixedModel:
    """Stands in for the transformers model: `generate` appends fixed tokens (what greedy decoding produced)."""

    def __init__(self, new_tokens):
        self.new, self.device, self.calls = new_tokens, torch.device("cpu"), []

    def forward(self, input_ids=None, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
                image_grid_thw=None):
        raise AssertionError("not called")

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        return torch.cat([input_ids, torch.tensor([self.new])], 1)


def test_exact_match_is_on_tokens_with_the_turn_end_as_validation():
    tok = Encoder(embedded_model_dir(), max_tokens=64).processor.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    prompt = {"input_ids": torch.tensor([ids("Q")]), "source": "p.jsonl:1"}
    ref = ids("red") + [im_end]

    def judge(new, reference_ids=ref, max_new_tokens=8):
        model = _FixedModel(new)
        out = Predictor(model, tok, GenerationOptions(max_new_tokens=max_new_tokens)).answer(
            {**prompt, "reference": "red", "reference_ids": reference_ids}, 0)
        return out, model.calls[0]

    assert judge(ref)[0]["correct"] is True and judge(ref)[0]["answer"] == "red"
    assert judge(ids("red") + [eot])[0]["correct"] is False  # stopped, but not with the turn's end
    assert judge(ids("red\n") + [im_end])[0]["correct"] is False  # same text once stripped: validation says wrong
    assert judge(ids("red"))[0] == {"answer": "red", "finished": False, "new_tokens": len(ids("red")),
                                    "correct": False}
    # a reference longer than max_new_tokens still gets the tokens it needs to be matched
    assert judge(ref, max_new_tokens=1)[1]["max_new_tokens"] == len(ref)
    # a text-only model never silently drops the pixels of an image prompt
    text_only = Predictor(_FixedModel(ref), tok, GenerationOptions())
    text_only.accepted = {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="p.jsonl:1: it holds images or videos.*text-only"):
        text_only.answer({**prompt, "pixel_values": torch.zeros(4, 8)}, 0)


def test_transformers_model_shares_tensors_and_gives_the_native_logits():
    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(embedded_model_dir(), dtype=None)
    ids = torch.randint(0, 200, (1, 23))
    hf = transformers_model(model)
    experts = "model.language_model.layers.0.mlp.experts"
    assert hf.get_parameter(f"{experts}.gate_up_proj").data_ptr() == \
        model.get_parameter(f"{experts}.gate_and_up_projs").data_ptr()  # a view: nothing copied
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["all-linear"], expert_rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # B = 0 at init would make the merge invisible
        native = model(input_ids=ids).logits
        hf = transformers_model(model)
        torch.testing.assert_close(hf(input_ids=ids).logits, native, rtol=0, atol=1e-5)
        assert (hf(input_ids=ids).logits - Qwen3_5MoeForConditionalGeneration.from_pretrained(
            embedded_model_dir(), dtype=None)(input_ids=ids).logits).abs().max() > 1e-3  # the adapters count


def _teacher_forced_by_document(module, datamodule) -> dict[str, bool]:
    """source:line -> validation's exact match of that document (packed rows, argmax under teacher forcing)."""
    datamodule.setup("validate")
    ds = datamodule.val_dataset
    out = {}
    with torch.no_grad():
        for p in range(len(ds)):
            batch = ds[p]
            res = module(batch, num_items_in_batch=1, label_logits_only=True)
            correct, _ = document_answer_correct(res.logits.argmax(-1), batch["labels"], batch["cu_seqlens"],
                                                 batch["mm_token_type_ids"])
            for doc, ok in zip(batch["documents"], correct.tolist()):
                rec = ds.records[doc]
                out[f"{rec['source']}:{rec['line']}"] = ok
    return out


@pytest.mark.slow
def test_predict_exact_match_equals_validation_document_by_document(tmp_path):
    data = write_small_dataset(tmp_path / "data", n_rows=36, seed=3)
    root = tmp_path / "run"
    common = ["--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--data.train_path", str(data), "--data.val_path", str(data), "--data.max_tokens", "128",
              "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")]
    fit = cli.main(["fit", *common, "--trainer.max_steps", "150", "--trainer.val_check_interval", "150",
                    "--model.lr", "3e-3"])
    ckpt = str(root / "checkpoints" / "last.ckpt")
    metrics = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")}
    pred = cli.main(["predict", *common, "--data.predict_path", str(data), "--ckpt_path", ckpt,
                     "--model.generation.max_new_tokens", "12"])
    rows = [json.loads(line) for line in open(root / "predictions.jsonl")]
    assert len(rows) == 36 and all(r["reference"] is not None for r in rows)
    # the predict config is kept beside the fit's, which stays config.yaml (what a resume is told to use)
    assert len(list((root / "checkpoints").glob("config-predict-*.yaml"))) == 1
    assert "predict_path: null" in (root / "checkpoints" / "config.yaml").read_text()
    teacher = _teacher_forced_by_document(pred.model, fit.datamodule)
    generated = {r["source"]: r["correct"] for r in rows}
    assert set(generated) == set(teacher)
    assert generated == teacher, {k: (teacher[k], generated[k]) for k in teacher if teacher[k] != generated[k]}
    right = [r for r in rows if r["correct"]]
    assert 0 < len(right) < len(rows), "the check needs right and wrong answers"
    assert any(len(r["answer"].split()) >= 2 for r in right), "and a right answer of several tokens"
    summary = _summary(pred)
    assert summary["kinds"]["image"]["acc"] == pytest.approx(metrics["val/image_acc"], abs=1e-9)
    assert summary["kinds"]["text"]["acc"] == pytest.approx(metrics["val/text_acc"], abs=1e-9)

    # negative control: a prompt cut one token late (it already holds the answer's first token) must disagree
    predictor = Predictor(transformers_model(pred.model.model), pred.datamodule.encoder.processor.tokenizer,
                          GenerationOptions(max_new_tokens=12))
    ds = pred.datamodule.predict_dataset
    late = {}
    for i in range(len(ds)):
        item = ds[i]
        rec = fit.datamodule.val_dataset.records
        full = next(rec[j] for j in range(len(rec)) if f"{rec[j]['source']}:{rec[j]['line']}" == item["source"])
        k = item["input_ids"].shape[1]
        item["input_ids"] = torch.tensor([full["input_ids"][:k + 1]])
        item["attention_mask"] = torch.ones_like(item["input_ids"])
        item["mm_token_type_ids"] = torch.cat([item["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
        late[item["source"]] = predictor.answer(item, i)["correct"]
    assert late != teacher


def test_predict_without_references_and_with_a_bad_row(tmp_path, small_data):
    rows = _rows(small_data)[:5]
    prompts = small_data.parent / "prompts.jsonl"  # image paths are relative to the file
    with open(prompts, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": f"q{i}", "messages": row["messages"][:-1]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image", "image": "missing.png"}, {"type": "text", "text": "What color?"}]}]}) + "\n")
    root = tmp_path / "run"
    app = cli.main(["predict", "--config", TINY, "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "false", "--data.predict_path", str(prompts),
                    "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
                    "--model.generation.max_new_tokens", "3", "--model.generation.temperature", "1.0"])
    out = [json.loads(line) for line in open(root / "predictions.jsonl")]
    assert [r["prompt_id"] for r in out] == [f"q{i}" for i in range(5)] + ["prompts.jsonl:6"]
    assert all(r["reference"] is None and r["correct"] is None and r["new_tokens"] <= 3 for r in out[:5])
    # the row that cannot be a prompt is reported where it was, with its reason, not dropped
    assert out[5]["answer"] is None and out[5]["error"].startswith("missing_image: ")
    assert out[5]["source"] == f"{prompts}:6"
    assert app.datamodule.stats["predict"] == {"missing_image": 1, "ok": 5}
    assert _summary(app)["judged"] == 0 and _summary(app)["failed"] == 1
    # sampling is seeded per prompt: the same answers again
    again = cli.main(["predict", "--config", TINY, "--trainer.default_root_dir", str(root),
                      "--trainer.enable_progress_bar", "false", "--data.predict_path", str(prompts),
                      "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
                      "--model.generation.max_new_tokens", "3", "--model.generation.temperature", "1.0"])
    assert [json.loads(line) for line in open(root / "predictions.jsonl")] == out
    assert _summary(again)["prompts"] == 6


@pytest.mark.slow
def test_text_only_model_trains_and_predicts_and_refuses_images(tmp_path, small_data, capsys):
    text = small_data.parent / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in _rows(small_data) if isinstance(r["messages"][0]["content"],
                                                                                           str)))
    root = tmp_path / "run"
    common = ["--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--data.max_tokens", "128", "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
              "--model.text_only", "true"]
    fit = ["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
           "--data.val_path", str(text)]
    app = cli.main([*fit, "--data.train_path", str(text)])
    assert app.trainer.global_step == 2 and type(app.model.model).__name__ == "Qwen3_5MoeForCausalLM"
    # predict reads weights only: a training setting that differs from the checkpoint's (lr) does not matter
    ckpt = str(root / "checkpoints" / "last.ckpt")
    pred = cli.main(["predict", *common, "--data.predict_path", str(text), "--ckpt_path", ckpt, "--model.lr", "0.5",
                     "--model.generation.max_new_tokens", "4"])
    rows = [json.loads(line) for line in open(root / "predictions.jsonl")]
    assert len(rows) == 8 and all(r["kind"] == "text" and r["error"] is None for r in rows)
    assert _summary(pred)["judged"] == 8
    # ... one that shapes the model does
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", *common, "--data.predict_path", str(text), "--ckpt_path", ckpt,
                  "--model.lora", "{rank: 2}"])
    assert exit_info.value.code == 2 and "model.lora" in capsys.readouterr().err
    # image rows on a text-only model: an error, never pixels silently dropped
    with pytest.raises(ValueError, match="Qwen3_5MoeForCausalLM is text-only, but the batch holds images"):
        cli.main([*fit, "--data.train_path", str(small_data), "--trainer.default_root_dir", str(tmp_path / "r2")])


def _summary(app) -> dict:
    """What the CLI's PredictionWriter counted in the last predict of `app` (a cli.main result)."""
    from callbacks.predictions import PredictionWriter

    writers = [c for c in app.trainer.callbacks if isinstance(c, PredictionWriter)]
    assert len(writers) == 1, app.trainer.callbacks
    return writers[0].summary
