"""`llava pretrain|finetune|lora` for the distributed tests, run by torchrun, with one observer:
before the first step, every rank gathers each component's weights (collectively, as ZeRO-3
needs) and rank 0 writes them to PROBE, so a test can compare them with the files they were
loaded from. Otherwise it is the command's own library call (commands are thin).

Usage: zero_probe.py STAGE PROBE FLAGS_JSON
"""

from __future__ import annotations

import json
import sys
from typing import Any

from transformers import TrainerCallback

from llava_cli.config.resolve import resolve_config
from llava_cli.model.partitioned import gathered
from llava_cli.model.parts import components
from llava_cli.train.process import process_group_closed_at_end
from llava_cli.train.reporting import Reporter
from llava_cli.train.run import run_training


class WeightsAtStart(TrainerCallback):
    """Writes the gathered weights of the vision tower, projector, LLM and lm_head."""

    def __init__(self, target: str) -> None:
        self.target = target

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        from safetensors.torch import save_file

        parts = components(model)
        weights = {}
        for name in ("vision_tower", "projector", "llm", "lm_head"):
            module = getattr(parts, name)
            with gathered(module):
                weights.update({f"{name}.{key}": value.detach().cpu().clone().contiguous()
                                for key, value in module.state_dict().items()})
        if state.is_world_process_zero:
            save_file(weights, self.target)


class ProbeReporter(Reporter):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def callback(self) -> TrainerCallback:
        return WeightsAtStart(self.target)


def main() -> None:
    stage, probe, flags = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = resolve_config(stage, None, None, flags)
    with process_group_closed_at_end():
        run_training(config, ProbeReporter(probe))


if __name__ == "__main__":
    main()
