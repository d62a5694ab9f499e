"""Helpers shared by the tests: where things are, a local tokenizer loader, a probe batch."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# Config-only tiny LLM (Llama, hidden 64, 2 layers) and CLIP vision tower (32 px, patch 8),
# shipped with the tiny recipes; tests build them with random_init.
TINY_LLM = RECIPES / "tiny" / "llm"
TINY_VISION = RECIPES / "tiny" / "vision"
PROBE_TEXT = "USER: <image>\nWhat color is the shape? ASSISTANT: red"


def shared_assets() -> Path:
    """Where the real test assets are expected: `../shared/assets`, or `$LLAVA_TEST_SHARED/assets`
    when that variable names another shared folder (CI sets it to a missing folder to prove a
    plain clone passes). Tests reach it through the `assets` fixture or `require_assets()`."""
    shared = os.environ.get("LLAVA_TEST_SHARED")
    return (Path(shared) if shared else ROOT.parent / "shared") / "assets"


def require_assets() -> Path:
    """The shared assets folder; skips the calling test, with its reason, when it is absent
    (a plain clone without ../shared). The one place such a skip is decided."""
    import pytest

    folder = shared_assets()
    if not folder.is_dir():
        pytest.skip(f"shared test assets not found at {folder} (a plain clone without "
                    "../shared); CI provides them")
    return folder


def golden_folder() -> Path:
    """`assets/golden`: reference ids/labels produced by the original LLaVA code (skips the
    calling test without the shared assets)."""
    return require_assets() / "golden"


GOLDEN_MAX_LENGTH = 2048  # the golden files were made with model_max_length 2048


@cache
def golden_encoder(name: str):
    """Our `llava`-mode TextEncoder on one of the golden folder's tokenizers."""
    from llava_cli.data.text.encoding import TextEncoder

    tokenizer = load_tokenizer(golden_folder() / "tokenizers" / name)
    return TextEncoder(tokenizer, -200, "llava", GOLDEN_MAX_LENGTH)


def golden_encode(record: dict, mode: str, encoder):
    """One golden record encoded in template `mode` the way training does: (encoded, conv)."""
    from llava_cli.data.conversation import RecordError, llava_normalize, parse_record
    from llava_cli.data.text.templates import TEMPLATES, render

    template = TEMPLATES[mode]
    conv = parse_record(record, strict=template.max_rounds is not None)
    if template.requires_image and not conv.images:
        raise RecordError(conv.record_id, "needs-image", "needs an image")
    conv = llava_normalize(conv)
    rendered = render(template, conv.messages, conv.system)
    return encoder(rendered, [1] * len(conv.images)), conv


def load_tokenizer(path: Path):
    """A tokenizer from a local folder, never the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def llama_tokenizer_as_trained(assets: Path):
    """The real Llama-2/Vicuna tokenizer (from the `assets` folder) with `<image>` (id 32000)
    and `<unk>` as pad, as training sets it up."""
    tok = load_tokenizer(assets / "tokenizers" / "llama2-vicuna-v1.5")
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]})
    tok.pad_token = tok.unk_token
    return tok


def probe_batch(processor):
    """A one-image probe batch (red picture + a v1 prompt) to compare models' logits on."""
    from PIL import Image

    return processor(images=Image.new("RGB", (40, 30), (220, 40, 40)), text=PROBE_TEXT,
                     return_tensors="pt")


def eval_logits(model, batch):
    """The model's logits on `batch`, in eval mode without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def tiny_finetune_output(root: Path) -> Path:
    """A finetune output of a tiny random-init model (pretrain → finetune, 2 steps each, 4
    generated shape pictures per stage) written under `root`, for tests that start from a
    trained checkpoint saved to disk."""
    import warnings

    from llava_cli.config.resolve import resolve_config
    from llava_cli.demo.shapes import generate_split
    from llava_cli.train.run import run_training

    common = {"per_device_train_batch_size": 2, "save_steps": 100, "learning_rate": 1e-2,
              "seed": 7, "dataloader_num_workers": 0}
    data = {kind: generate_split(root / kind, 4, 0, kind) for kind in ("pretrain", "finetune")}

    def train(stage: str, **keys) -> Path:
        flags = {**common, "data_path": str(data[stage]), "image_folder": str(data[stage].parent),
                 "output_dir": str(root / f"{stage}-run"), "max_steps": 2, **keys}
        return run_training(resolve_config(stage, flags=flags)).output_dir

    with warnings.catch_warnings():  # the random-init warning: expected here
        warnings.simplefilter("ignore", UserWarning)
        pretrain = train("pretrain", model_name_or_path=str(TINY_LLM),
                         vision_tower=str(TINY_VISION), tokenizer="demo", random_init=True)
    return train("finetune", model_name_or_path=str(pretrain))
