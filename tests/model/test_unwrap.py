"""The one unwrapping rule (`model.parts.base_model`, `without_engine`): the model inside a
DDP wrapper or DeepSpeed engine (`.module`) and inside a PeftModel, whatever holds which."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from llava_cli.model.parts import base_model, without_engine


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _Engine(torch.nn.Module):
    """What DDP and a DeepSpeed engine look like from outside: the model as `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_every_wrapping_unwraps_to_the_same_model():
    tiny = _Tiny()
    peft = get_peft_model(tiny, LoraConfig(r=2, target_modules=["lin"]))
    assert base_model(tiny) is tiny
    assert base_model(peft) is tiny
    assert base_model(_Engine(peft)) is tiny
    assert base_model(_Engine(tiny)) is tiny
    assert without_engine(_Engine(peft)) is peft  # the adapter stays switchable
    assert without_engine(peft) is peft


def test_an_attribute_named_module_that_is_no_model_is_not_unwrapped():
    tiny = _Tiny()
    tiny.module = "not a model"  # only an nn.Module held as .module is a wrapper's
    assert without_engine(tiny) is tiny and base_model(tiny) is tiny
