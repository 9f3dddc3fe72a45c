"""Answer generation for `cli.py predict`: the trained native model as an in-memory transformers model, transformers'
`generate` (greedy by default), and the exact-match judge.

Why transformers' `generate` rather than a native decode loop: the native model is a training model (packed rows,
no cache), while transformers' implementation is the numerical reference it matches to the last logit
(tests/test_model_parity.py) and brings the attention KV cache, the linear-attention (conv + recurrent state) cache
and every sampling option. The conversion shares the native tensors (experts as transposed views, nothing copied);
only LoRA-adapted weights are materialised merged, one new tensor each. So predict holds the model once, plus the
merged adapted weights and the cache.

Exact match is judged on tokens, as validation judges it (`evaluation.py`): an answer is right when the generated
tokens begin with the reference turn's target tokens, its end token included (`reference_ids`). With the prompt cut
from the row's own training encoding (`Encoder.encode_prompt`), that is what validation's teacher-forced exact match
measures: every argmax along the reference is the reference token iff greedy decoding reproduces it. The two can
differ only where two logits tie within rounding (the implementations agree to ~1e-6). A row with a reference is
given at least as many new tokens as its reference has, whatever `max_new_tokens` says. The `answer` text written
out is the decoded tokens before the first end token, a thinking block and outer whitespace removed (display only).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from .models.settings import section_from

_THINK = re.compile(r"^(\s*<think>)?.*?</think>", flags=re.DOTALL)  # a thinking template may open it in the prompt
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # the chat turn's end and the document end


@dataclass
class GenerationOptions:
    """Decoding options of `cli.py predict` (`--model.generation.max_new_tokens 32`, ...)."""

    max_new_tokens: int = 64  # rows with a reference get at least the reference's length
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sampling at this temperature
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 0  # sampling seed: prompt i samples with seed + i, the same answers whatever the order

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"generation.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")


    @classmethod
    def from_any(cls, value) -> GenerationOptions:
        """None -> the defaults; a dict (YAML, checkpoint hyperparameters) -> GenerationOptions; one as is."""
        return cls() if value is None else section_from(cls, value, "generation")


def normalise_answer(text: str) -> str:
    """The answer as shown: without a thinking block (also one opened by the prompt), outer whitespace stripped."""
    return (_THINK.sub("", text, count=1) if "</think>" in text else text).strip()


@torch.no_grad()
def transformers_model(model: nn.Module, fetch=None):
    """The native `model` (LoRA merged) as the transformers model of its architecture, sharing its tensors.

    fetch: how a state-dict tensor is read (`parallel.state.full_tensor_fetcher` for an FSDP2 / expert-parallel
    model on one process: full tensors, copied)."""
    import transformers

    from .lora import MergedStateDict

    adapter = model.state_dict_adapter()
    view = MergedStateDict(model, fetch)
    state = {}
    for key in view:
        for hf_key, tensor in adapter.convert_single_tensor_to_hf(key, view[key].detach(), in_memory=True):
            state[hf_key] = tensor
    cls = getattr(transformers, model.hf_architecture())
    weight = model.text_model.embed_tokens.weight
    # device_map: tensors already on that device are taken as they are (without it transformers copies every
    # tensor to the CPU first); non-persistent buffers (rotary inv_freq) are built there too
    hf = cls.from_pretrained(None, config=model.config, state_dict=state, dtype=weight.dtype,
                             device_map={"": weight.device})
    return hf.eval()


class Predictor:
    """Generates and judges the answer to one prompt micro-batch (`data_modules.prompts.PromptDataset`)."""

    MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                    "pixel_values_videos", "video_grid_thw")

    def __init__(self, hf_model, tokenizer, options: GenerationOptions):
        self.model, self.tokenizer, self.options = hf_model, tokenizer, options
        self.accepted = set(inspect.signature(hf_model.forward).parameters)  # a text-only model takes no pixels
        stops = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS} | {tokenizer.eos_token_id}
        self.stop_ids = sorted(t for t in stops if t is not None and t != tokenizer.unk_token_id)
        if not self.stop_ids:
            raise ValueError(f"the tokenizer knows none of the end tokens {STOP_TOKENS} and has no eos token: "
                             "generation could never stop")

    @torch.no_grad()
    def answer(self, batch: dict, index: int) -> dict:
        """-> {answer, finished, new_tokens, correct (None without a reference)} for the prompt `batch`."""
        o = self.options
        inputs = {k: batch[k] for k in self.MODEL_INPUTS if batch.get(k) is not None}
        dropped = {k for k in inputs if k not in self.accepted}
        if dropped - {"mm_token_type_ids"} or ("mm_token_type_ids" in dropped
                                               and bool((inputs["mm_token_type_ids"] != 0).any())):
            raise ValueError(f"prompt {batch.get('source')}: it holds images or videos, but the model "
                             f"({type(self.model).__name__}) is text-only")
        inputs = {k: v for k, v in inputs.items() if k in self.accepted}
        reference_ids = batch.get("reference_ids")
        sampling = o.temperature > 0
        budget = max(o.max_new_tokens, len(reference_ids)) if reference_ids else o.max_new_tokens
        kwargs = dict(max_new_tokens=budget, do_sample=sampling, eos_token_id=self.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.stop_ids[0])
        # greedy: no sampling options at all (the model's generation_config may carry some; they would warn)
        kwargs.update(temperature=o.temperature if sampling else None, top_p=o.top_p if sampling else None,
                      top_k=None)
        device = self.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=sampling):
            if sampling:
                torch.manual_seed(o.seed + index)
            out = self.model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        stop = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        text = self.tokenizer.decode(new if stop is None else new[:stop], skip_special_tokens=False)
        correct = None if not reference_ids else new[:len(reference_ids)] == list(reference_ids)
        return {"answer": normalise_answer(text), "finished": stop is not None, "new_tokens": len(new),
                "correct": correct}

    def prediction_row(self, batch: dict) -> dict:
        """One predictions.jsonl row for a prompt micro-batch: prompt_id, source, kind, answer, reference, correct
        (None without a reference), finished, new_tokens, error (why a row could not be answered; None otherwise:
        a row the DataModule could not encode carries its error and is not generated)."""
        row = {k: batch[k] for k in ("prompt_id", "source", "kind")}
        if batch.get("error") is not None:
            return {**row, "answer": None, "reference": batch["reference"], "correct": None, "finished": None,
                    "new_tokens": 0, "error": batch["error"]}
        result = self.answer(batch, batch["index"])
        return {**row, "answer": result["answer"], "reference": batch["reference"], "correct": result["correct"],
                "finished": result["finished"], "new_tokens": result["new_tokens"], "error": None}
