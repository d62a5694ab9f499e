"""The files beside the weights of an original-layout output: its `llava_llama` config.json,
the vision tower folder its `mm_vision_tower` names, the slow SentencePiece tokenizer files
its `AutoTokenizer(use_fast=False)` reads, and which embedding rows it keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llava_cli.artifacts.files import write_atomically, write_text_atomically
from llava_cli.artifacts.manifest import read_manifest
from llava_cli.artifacts.original_layout import original_config
from llava_cli.data.text.tokenizer import IMAGE_TOKEN, PAD_TOKEN

TOWER_FOLDER = "vision_tower"
SLOW_TOKENIZER = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# transformers 5 config keys that say nothing about the model (and 4.x never wrote).
_NOISE = ("output_hidden_states", "return_dict", "dtype", "chunk_size_feed_forward",
          "is_encoder_decoder", "id2label", "label2id", "problem_type", "output_attentions",
          "_name_or_path", "transformers_version", "rope_parameters")
# An original LoRA run's adapter_config.json (PEFT 0.6-0.10): its keys, with their defaults.
ADAPTER_DEFAULTS: dict[str, Any] = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8,
    "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "peft_type": "LORA", "r": 8, "rank_pattern": {},
    "revision": None, "target_modules": None, "task_type": "CAUSAL_LM", "use_rslora": False}
_STRATEGIES = {"default": "patch", "full": "cls_patch"}
_IMAGE_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
               "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def config_for_original(config: Any, rows: int, tower: str, aspect: str,
                        architecture: str) -> dict[str, Any]:
    """The original's config.json for our LlavaConfig `config` (refusing what its
    LlavaLlamaForCausalLM cannot be: another LLM, tower, projector or feature selection)."""
    problems = []
    if config.model_type != "llava":
        problems.append(f"a {config.model_type} model (only LLaVA-1.5, not LLaVA-NeXT)")
    if config.text_config.model_type != "llama":
        problems.append(f"a {config.text_config.model_type} LLM (the original's llava_llama "
                        "is Llama)")
    if config.vision_config.model_type != "clip_vision_model":
        problems.append(f"a {config.vision_config.model_type} tower (the original builds "
                        "CLIP towers only)")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias",
                                                            True):
        problems.append("a projector other than mlp2x_gelu")
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or strategy not in _STRATEGIES:
        problems.append(f"vision features {layer!r}/{strategy!r} (one layer, default or full)")
    if problems:
        raise ValueError(f"cannot write the original layout for {', '.join(problems)}; "
                         "nothing was written")
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in _NOISE}
    rope = config.text_config.to_dict().get("rope_parameters") or {}
    text.update(vocab_size=rows, rope_theta=rope.get("rope_theta", 10000.0),
                rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
                torch_dtype="float32", architectures=[architecture])
    return original_config(text, tower, config.vision_config.hidden_size, layer,
                           _STRATEGIES[strategy], aspect, architecture)


def kept_rows(tokenizer: Any, vocab: int) -> int:
    """Embedding rows the original keeps: all but those of the `<image>` (and `<pad>`) tokens
    we added, which must be the last rows; any other added token cannot be written."""
    ours = sorted(tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_TOKEN, PAD_TOKEN)
                  if token in tokenizer.get_vocab())
    keep = vocab - len(ours)
    if ours != list(range(keep, vocab)):
        raise ValueError(f"the tokens {IMAGE_TOKEN}/{PAD_TOKEN} are not the model's last "
                         f"embedding rows (ids {ours} of {vocab}): the original LLaVA adds its "
                         "image token after the LLM's vocabulary and keeps only the rows "
                         "before it, so this tokenizer, which holds them among its own tokens "
                         "(as the built-in demo tokenizer of `llava demo` does), cannot be "
                         "written in the original layout; convert a model trained from an LLM "
                         "with its own tokenizer (llava pretrain adds the tokens at the end), "
                         "or serve this one as it is (stock transformers loads it)")
    if len(tokenizer) - len(ours) != keep:
        raise ValueError(f"the tokenizer has {len(tokenizer) - len(ours) - keep} added tokens "
                         "besides ours; the original's slow tokenizer would not know them")
    return keep


def write_tokenizer_files(source: Path, staging: Path) -> Path:
    """Copy the slow SentencePiece tokenizer files from the first folder that has them: the
    run, then the bases its manifests name (our outputs keep only tokenizer.json)."""
    folder = _slow_tokenizer_folder(source, depth=6)
    if folder is None:
        raise ValueError(f"{source}: no slow SentencePiece tokenizer (tokenizer.model with a "
                         "LlamaTokenizer tokenizer_config.json) here or in its bases; the "
                         "original loads tokenizers with use_fast=False and needs them")
    for name in SLOW_TOKENIZER:
        if (folder / name).is_file():
            write_atomically(staging / name,
                             lambda p, n=name: shutil.copyfile(folder / n, p))
    return folder


def _slow_tokenizer_folder(folder: Path, depth: int) -> Path | None:
    config = folder / "tokenizer_config.json"
    if (folder / "tokenizer.model").is_file() and config.is_file() and json.loads(
            config.read_text()).get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return folder
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None or depth == 0:
        return None
    base = manifest.base
    for nested in (base, getattr(base, "base", None)):
        for name in ("path", "llm"):
            found = getattr(nested, name, None)
            if found and Path(found).is_absolute() and Path(found).is_dir():
                hit = _slow_tokenizer_folder(Path(found), depth - 1)
                if hit is not None:
                    return hit
    return None


def write_tower_folder(vision_config: Any, tower: dict[str, Any], processor: Any,
                       staging: Path) -> Path:
    """`vision_tower/`: a CLIPVisionModel folder in transformers 4's layout (`vision_model.*`)
    with the CLIPImageProcessor settings we serve with (the original pads by itself)."""
    from safetensors.torch import save_file

    folder = staging / TOWER_FOLDER
    folder.mkdir()
    config = {k: v for k, v in vision_config.to_dict().items() if k not in _NOISE}
    config.update(architectures=["CLIPVisionModel"], torch_dtype="float32")
    write_text_atomically(folder / "config.json", json.dumps(config, indent=2) + "\n")
    state = {"vision_model." + k: v.contiguous() for k, v in tower.items()}
    write_atomically(folder / "model.safetensors",
                     lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    settings = {k: v for k, v in processor.image_processor.to_dict().items() if k in _IMAGE_KEYS}
    settings["image_processor_type"] = "CLIPImageProcessor"
    write_text_atomically(folder / "preprocessor_config.json",
                          json.dumps(settings, indent=2) + "\n")
    return folder
