"""Loading the model directory's processor, with a fallback when torchvision is missing, and the processor of a
text-only model (a tokenizer and its chat template: `TextOnlyProcessor`).

transformers 5.23 maps `qwen3_5_moe` (and `qwen3_vl*`) to `Qwen3VLProcessor`, whose video processor
(`Qwen3VLVideoProcessor`) requires torchvision; `AutoProcessor.from_pretrained` then raises ImportError even for
text + image data. torchvision is not a dependency of this project (on the CPU index it drags in a CUDA torch), so
the fallback builds the same processor class without its video sub-processor: identical tokenisation, chat
template and image preprocessing. Videos do not go through this processor: `video.py` reproduces the video
processor in torch + PIL and `encoding.Encoder` the processor's video placeholder expansion.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor with no video processor (ProcessorMixin derives its sub-processors from __init__ args)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TextOnlyProcessor:
    """What a text-only model directory (Qwen3-MoE: tokenizer files, no image processor) gives the data side: the
    tokenizer and its chat template, no image or video processor. `Encoder` counts a row with images or videos as
    `image_for_text_model` (strict: an error naming file:line)."""

    image_processor = None

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no chat template (chat_template.jinja or "
                             "tokenizer_config.json's chat_template): chat rows cannot be rendered")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False):
        # a text model's template takes string contents: a turn of text items is their concatenation
        flat = [{**m, "content": m["content"] if isinstance(m["content"], str)
                 else "".join(item["text"] for item in m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(flat, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)


def has_image_processor(model_dir: str) -> bool:
    """The directory configures an image processor (a vision-language model's), not only a tokenizer."""
    return any((Path(model_dir) / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))


# what the data side reads of a model: tokenizer, chat template, image / video preprocessor configs (not the weights)
PROCESSOR_FILES = ["*.json", "*.jinja", "*.txt", "*.model"]


def local_model_dir(model_path: str) -> str:
    """A local directory with `model_path`'s processor files: the path itself, or for a hub id ("org/name") the local
    snapshot of its processor files, fetched into the Hugging Face cache (the weights are left to the model, which
    downloads them into the same snapshot). Anything else is returned as given, for the caller's error to name."""
    if Path(model_path).is_dir():
        return model_path
    from qmoe_lightning.models.checkpoint import is_hub_id

    if not is_hub_id(model_path):
        return model_path
    from huggingface_hub import snapshot_download

    return snapshot_download(model_path, allow_patterns=PROCESSOR_FILES)


@functools.lru_cache(maxsize=4)
def load_processor(model_dir: str):
    """AutoProcessor of `model_dir`; image-only Qwen3-VL processor if the video processor cannot be built; a
    `TextOnlyProcessor` for a directory without an image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if not has_image_processor(model_dir):
        return TextOnlyProcessor(AutoTokenizer.from_pretrained(model_dir), _chat_template_file(model_dir))
    try:
        return AutoProcessor.from_pretrained(model_dir)
    except ImportError as err:
        if "orchvision" not in str(err):
            raise
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    chat_template = _chat_template_file(model_dir)
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    return Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=chat_template)


def _chat_template_file(model_dir: str) -> str | None:
    """The chat template a model directory keeps beside its tokenizer (`chat_template.jinja` / `.json`), if any."""
    template_file = Path(model_dir) / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    if (Path(model_dir) / "chat_template.json").is_file():
        return json.loads((Path(model_dir) / "chat_template.json").read_text())["chat_template"]
    return None


def spatial_merge_size(processor) -> int:
    return int(getattr(processor.image_processor, "merge_size", 2))
