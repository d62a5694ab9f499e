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


def tiny_runs(root: Path) -> dict[str, Path]:
    """`tiny_finetune_output`'s two runs under `root`: {"pretrain": …, "finetune": …}."""
    finetune = tiny_finetune_output(root)
    return {"pretrain": root / "pretrain-run", "finetune": finetune}


def tiny_finetune_output(root: Path) -> Path:
    """A finetune output of a tiny random-init model (pretrain → finetune, 2 steps each, 4
    generated shape pictures per stage) written under `root`, for tests that start from a
    trained checkpoint saved to disk."""
    import warnings

    from llava_cli.config.resolve import resolve_config
    from llava_cli.demo.shapes import generate_split
    from llava_cli.train.run import run_training

    common = {"per_device_train_batch_size": 2, "save_steps": 100, "learning_rate": 1e-2,
              "seed": 7, "dataloader_num_workers": 0, **PLAIN_SCHEDULE}
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


# --- runs on the shipped demo sample (tests/train) ---------------------------------------------


def demo_sample() -> tuple[str, str]:
    """The shipped sample records and their image folder (the package's own demo data)."""
    from llava_cli.inspect.inspection import demo_data

    return demo_data()


# The schedule these tests were written for (transformers' defaults). The stage defaults are
# LLaVA-1.5's (cosine, warmup 0.03; dpo accumulates 16 batches), which in a 1-3 step test
# would spend the first step at learning rate 0 and multiply a dpo step's work by 16.
PLAIN_SCHEDULE = {"warmup_ratio": 0.0, "lr_scheduler_type": "linear",
                  "gradient_accumulation_steps": 1}


def demo_run_flags() -> dict:
    """Training flags on the demo sample: batch 2, save every 2 steps, lr 1e-2, seed 7."""
    records, images = demo_sample()
    return {"data_path": records, "image_folder": images, "per_device_train_batch_size": 2,
            "save_steps": 2, "overwrite": True, "learning_rate": 1e-2, "seed": 7,
            **PLAIN_SCHEDULE}


def demo_run_config(stage: str, out: Path, **keys):
    """A resolved config for `stage` with `demo_run_flags`, writing to `out`; `keys` add or
    override flags."""
    from llava_cli.config.resolve import resolve_config

    return resolve_config(stage, flags={**demo_run_flags(), "output_dir": str(out), **keys})


def start_state(config) -> dict:
    """The starting model's weights for `config` (seeded as training seeds it), detached."""
    import transformers

    from llava_cli.model.start import load_starting_model

    transformers.set_seed(config.training_args.get("seed", 42))
    model = load_starting_model(config).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logged_losses(output_dir: Path) -> list[float]:
    """The training losses a run logged in its trainer_state.json, step by step."""
    import json

    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path → sha256): equal digests, identical bytes."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- a tiny LLaVA built in memory, and batches for it (speed levers, packing) ------------------

IMAGE = 599  # the tiny LLM's last id stands in for the image token
IMAGE_TOKENS = 16  # 32 px, patch 8, CLS dropped


def tiny_llava(attn: str = "sdpa"):
    """The tiny LLaVA (seed 0) in train mode with attention implementation `attn`."""
    import torch
    import transformers

    text = transformers.AutoConfig.from_pretrained(TINY_LLM)
    vision = transformers.AutoConfig.from_pretrained(TINY_VISION)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision,
                                      image_token_id=IMAGE, vision_feature_layer=-1,
                                      vision_feature_select_strategy="default",
                                      image_seq_length=IMAGE_TOKENS)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.train()


def lever_sample(prompt: list[int], reply: list[int], image: bool, seed: int) -> dict:
    """A dataset-style sample: prompt (and image tokens) masked, reply supervised."""
    import torch

    ids = [1, *([IMAGE] * IMAGE_TOKENS if image else []), *prompt, *reply, 2]
    labels = [-100] * (len(ids) - len(reply) - 1) + [*reply, 2]
    sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if image:
        sample["pixel_values"] = torch.randn(1, 3, 32, 32,
                                             generator=torch.Generator().manual_seed(seed))
    return sample


def lever_samples() -> list[dict]:
    """Three samples of different lengths, two with an image."""
    return [lever_sample([10, 11, 12], [40, 41, 42, 43], True, 0),
            lever_sample([13, 14, 15, 16, 17, 18, 19], [44, 45], False, 1),
            lever_sample([20, 21], [46, 47, 48], True, 2)]


def loss_and_grads(model, batch: dict, supervised: bool, num_items=None):
    """One forward/backward of `batch`: (loss, every parameter's gradient by name)."""
    from llava_cli.train.supervised_loss import supervised_cross_entropy, supervised_positions

    model.zero_grad()
    labels = batch["labels"]
    # use_cache=False as LlavaTrainer.compute_loss passes it: with a cache, transformers
    # ignores packed position ids.
    inputs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
    if supervised:
        outputs = model(**inputs, logits_to_keep=supervised_positions(labels))
        loss = supervised_cross_entropy(outputs, labels, num_items_in_batch=num_items)
    else:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        loss = model(**inputs, labels=labels, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_same_loss_and_grads(a, b) -> None:
    """Two `loss_and_grads` results agree: the loss, and every gradient (more than ten)."""
    import torch

    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6,
                                   msg=f"gradient of {name} differs")


# --- 2-process runs (torchrun on gloo) and their checks (tests/train, slow) --------------------


def torchrun_launcher() -> list[str]:
    """This environment's torchrun, or `python -m torch.distributed.run` without it."""
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                      "torch.distributed.run"]


def finetuned_base(root: Path):
    """One finetune step of a new tiny LLaVA (random init, in-process), saved in root/base:
    the base the 2-process runs load from disk. Returns the run's result."""
    import pytest
    import transformers

    from llava_cli.config.resolve import resolve_config
    from llava_cli.train.run import run_training

    records, images = demo_sample()
    transformers.LlamaConfig(
        vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    ).save_pretrained(root / "llm")
    transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4).save_pretrained(root / "vit")
    config = resolve_config("finetune", flags={
        "data_path": records, "image_folder": images, "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "seed": 7, "max_steps": 1, "output_dir": str(root / "base"),
        "model_name_or_path": str(root / "llm"), "vision_tower": str(root / "vit"),
        "tokenizer": "demo", "random_init": True, **PLAIN_SCHEDULE})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return run_training(config)


class Run:
    """One finished `torchrun --nproc_per_node 2 -m llava_cli …` job and its per-rank logs."""

    def __init__(self, output_dir: Path, logs: Path, seconds: float) -> None:
        self.output_dir = output_dir
        self.logs = logs
        self.seconds = seconds

    def rank_log(self, rank: int) -> str:
        """stdout + stderr of one rank (torchrun --redirects 3 writes them per rank)."""
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.logs.glob(f"**/attempt_*/{rank}/std*.log")))

    @property
    def state(self) -> dict:
        import json

        return json.loads((self.output_dir / "trainer_state.json").read_text())

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.state["log_history"] if "loss" in row]


def consolidated(checkpoint: Path) -> dict:
    """DeepSpeed's fp32 master weights from a ZeRO checkpoint, whole (its own tooling)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def model_from_state(config_dir: Path, state: dict):
    """A LLaVA built from a saved config with exactly `state`'s weights (no file loading)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    model = transformers.LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k in dict(model.named_parameters())]
    return model


def plain_model(output_dir: Path):
    """The output as any user loads it: stock transformers, one process, no DeepSpeed config."""
    import transformers
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()
    return transformers.LlavaForConditionalGeneration.from_pretrained(output_dir)


def assert_quiet_other_rank(run: Run) -> None:
    """Only rank 0 prints the Rich UI and the metrics; rank 1 says nothing of the run."""
    rank0, rank1 = run.rank_log(0), run.rank_log(1)
    assert "step 1:" in rank0 and "train metrics" in rank0 and "done:" in rank0
    for marker in ("step 1:", "train metrics", "llava training run", "done:", "Traceback"):
        assert marker not in rank1, marker


def assert_no_placeholders(file: Path, reference: Path) -> None:
    """Every tensor of a saved file has its full shape (ZeRO-3 leaves (0,) when not gathered)."""
    import torch
    from safetensors.torch import load_file

    saved, expected = load_file(str(file)), load_file(str(reference))
    assert saved.keys() == expected.keys()
    for key, tensor in saved.items():
        assert tensor.shape == expected[key].shape and tensor.numel() > 0, key
        assert torch.isfinite(tensor).all(), key


def assert_output_is_the_trained_model(run: Run, steps: int = 4) -> None:
    """Plain reload of the output == DeepSpeed's consolidated fp32 masters (of the checkpoint
    at `steps`), weights and logits."""
    import torch
    import transformers

    masters = consolidated(run.output_dir / f"checkpoint-{steps}")
    reference = model_from_state(run.output_dir, masters)
    reloaded = plain_model(run.output_dir)
    ours = reloaded.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(ours[key], tensor), key
    batch = probe_batch(transformers.AutoProcessor.from_pretrained(run.output_dir))
    assert torch.equal(eval_logits(reloaded, batch), eval_logits(reference, batch))
