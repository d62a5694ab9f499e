"""Every path a run reads, checked before anything heavy loads: a missing local file or
folder is named at once ("no such file or folder"), and a hub id that cannot be fetched (no
network, or offline mode without a cached copy) fails at once with one line instead of after
transformers' retries.

A value *looks local* when it starts with `/`, `./`, `../` or `~`, ends with `/`, or has more
than one `/` (a hub id is `name` or `owner/name`); anything else is a hub id unless a file or
folder of that name exists here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from llava_cli.config.run_config import ConfigError, RunConfig

# Read by the run, never written: a file or folder that must exist.
DATA_INPUTS = ("data_path", "eval_data_path", "eval_generate", "pretrained_projector")
FOLDER_INPUTS = ("image_folder", "eval_image_folder", "eval_generate_image_folder")
# A local folder or a hub id.
MODEL_INPUTS = ("model_name_or_path", "vision_tower", "tokenizer")
BUILT_IN_TOKENIZERS = ("demo",)  # data.text.tokenizer builds these itself


def looks_local(value: str) -> bool:
    """Whether `value` is meant as a local path rather than a hub id."""
    return (value.startswith(("/", "./", "../", "~", ".\\")) or value.endswith("/")
            or value.count("/") > 1 or value in (".", ".."))


def refuse_missing_inputs(config: RunConfig, reach_hub: bool = True) -> None:
    """Raise ConfigError naming the first input that cannot be read. `reach_hub`: also
    check that a hub id not in the local cache can be fetched (not for `--print-config`)."""
    for key in DATA_INPUTS:
        value = getattr(config, key)
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f"{key} {value!r}: no such file or folder")
    for key in FOLDER_INPUTS:
        value = getattr(config, key)
        if value and not Path(value).expanduser().is_dir():
            # worded as the QA reader words it (`answers.qa_set`), for the file it serves
            which = f"--eval-generate {config.eval_generate}: " \
                if key == "eval_generate_image_folder" else f"{key}: "
            raise ConfigError(f"{which}image folder {value!r} is not a folder; give the folder "
                              "the records' image paths start from (default: the data file's)")
    deepspeed = config.training_args.get("deepspeed")
    if isinstance(deepspeed, str) and not Path(deepspeed).expanduser().is_file():
        raise ConfigError(f"deepspeed {deepspeed!r}: no such file (give a DeepSpeed JSON "
                          "config, e.g. recipes/deepspeed/zero3.json)")
    if config.resume and config.resume != "latest" and not Path(config.resume).exists():
        raise ConfigError(f"resume {config.resume!r}: no such checkpoint folder (give one, "
                          "or 'latest' for the newest in the output directory)")
    for key in MODEL_INPUTS:
        value = getattr(config, key)
        if not value or Path(value).expanduser().exists():
            continue
        if key == "tokenizer" and value in BUILT_IN_TOKENIZERS:
            continue
        if looks_local(value):
            raise ConfigError(f"{key} {value!r}: no such file or folder")
        if reach_hub:
            refuse_unreachable_hub_id(key, value)


def refuse_unreachable_hub_id(key: str, repo_id: str) -> None:
    """A hub id neither cached nor fetchable here: one line now, not a minute of retries."""
    if _cached(repo_id):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise ConfigError(f"{key} {repo_id!r}: not a local folder, not in the Hugging Face "
                          "cache, and HF_HUB_OFFLINE is set; give a local folder")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise ConfigError(f"{key} {repo_id!r}: not a local folder, and the Hugging Face hub "
                          f"({host}) cannot be reached ({err.strerror or err}); give a local "
                          "folder, or check the network") from None


def _cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a copy of `repo_id` (any revision)."""
    home = Path(os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser())
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    return (hub / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir()
