"""Loading the model directory's processor, with a fallback when torchvision is missing.

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
    """AutoProcessor of `model_dir`; image-only Qwen3-VL processor if the video processor cannot be built."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except ImportError as err:
        if "orchvision" not in str(err):
            raise
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    template_file = Path(model_dir) / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else None
    if chat_template is None and (Path(model_dir) / "chat_template.json").is_file():
        chat_template = json.loads((Path(model_dir) / "chat_template.json").read_text())["chat_template"]
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    return Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=chat_template)


def spatial_merge_size(processor) -> int:
    return int(getattr(processor.image_processor, "merge_size", 2))
