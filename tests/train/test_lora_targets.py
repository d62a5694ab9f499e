"""LoRA on any LLM: every linear layer of the language model gets an adapter (as the original
LLaVA's `find_all_linear_names`), whatever the architecture names its layers; vision tower,
projector and lm_head never do. Tiny Phi-3, Phi-2 and GPT-NeoX LLaVAs built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import RunConfig
from llava_cli.inspect.inspection import demo_data
from llava_cli.model.lora import apply_lora, lora_layers, lora_targets
from llava_cli.train.reporting import lora_summary
from tests.helpers import TINY_LLM, TINY_VISION

pytest.importorskip("peft")

IMAGE_ID, TOKENS_PER_IMAGE = 599, 16  # tiny CLIP: (32 px / patch 8)², CLS dropped
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 600, "max_position_embeddings": 256,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# What every architecture calls its linear layers (per decoder layer): written out by hand.
LAYER_LINEARS = {
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "phi": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
            "mlp.fc1", "mlp.fc2"),
    "gpt_neox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h"),
}


def _text_config(kind: str) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(kind, **SMALL)


def _llava(kind: str) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.AutoConfig.from_pretrained(TINY_VISION),
        text_config=_text_config(kind), image_token_id=IMAGE_ID,
        vision_feature_select_strategy="default", image_seq_length=TOKENS_PER_IMAGE)
    return transformers.LlavaForConditionalGeneration(config)


def _expected(kind: str, only: tuple[str, ...] | None = None) -> list[str]:
    return sorted(f"model.language_model.layers.{n}.{linear}" for n in (0, 1)
                  for linear in LAYER_LINEARS[kind]
                  if only is None or linear.rsplit(".", 1)[-1] in only)


def _batch() -> dict[str, torch.Tensor]:
    text = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.tensor([[1] + [IMAGE_ID] * TOKENS_PER_IMAGE]), text], dim=1)
    labels = ids.clone()
    labels[:, :TOKENS_PER_IMAGE + 1] = -100
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def _lora_config(**keys) -> RunConfig:
    return RunConfig(train_llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, **keys)


@pytest.mark.parametrize("kind", sorted(LAYER_LINEARS))
def test_every_linear_layer_of_any_llm_gets_lora_and_a_step_trains_only_lora(kind, tmp_path):
    from peft import PeftModel

    model = _llava(kind)
    peft_model = apply_lora(model, _lora_config(train_projector="frozen"))
    assert lora_layers(peft_model) == _expected(kind)  # exactly these, nothing in vision
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B starts at zero: A moves from the second step on
        peft_model(**_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n in before if ".lora_A." in n or ".lora_B." in n}
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == _expected(kind)
    reloaded = PeftModel.from_pretrained(_llava(kind), tmp_path)
    assert lora_layers(reloaded) == _expected(kind)
    batch = _batch()
    peft_model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, reloaded(**batch).logits)


def test_lora_target_modules_chooses_layer_kinds_and_names_the_choices():
    model = _llava("phi3")
    assert lora_targets(model, ["qkv_proj", "o_proj"]) == _expected("phi3",
                                                                    ("qkv_proj", "o_proj"))
    with pytest.raises(ValueError, match="'q_proj' is no linear layer of this LLM; choose "
                                         "among down_proj, gate_up_proj, o_proj, qkv_proj"):
        lora_targets(model, ["q_proj"])
    with pytest.raises(ValueError, match="empty"):
        lora_targets(model, [])
    peft_model = apply_lora(model, _lora_config(lora_target_modules=["down_proj"]))
    assert lora_layers(peft_model) == _expected("phi3", ("down_proj",))
    assert lora_summary(lora_layers(peft_model)) == "2 linear layers: down_proj ×2"


def test_lora_target_modules_reads_a_list_or_all_linear_from_every_source():
    sets = ["lora_target_modules=[q_proj, v_proj]"]
    assert resolve_config("lora", sets=sets).lora_target_modules == ["q_proj", "v_proj"]
    assert resolve_config("lora").lora_target_modules == "all-linear"
    with pytest.raises(ValueError, match="lora_target_modules"):
        resolve_config("lora", sets=["lora_target_modules=everything"])


def test_a_lora_run_on_a_gpt_neox_llm_trains_and_reports_what_was_wrapped(tmp_path):
    """End to end: a new LLaVA on a GPT-NeoX LLM (which the old Llama-name pattern made fail
    inside PEFT), LoRA from the first step, the summary naming the wrapped layers."""
    from rich.console import Console

    from llava_cli.train.reporting import Reporter
    from llava_cli.train.run import run_training

    llm = tmp_path / "neox"
    _text_config("gpt_neox").save_pretrained(llm)
    records, images = demo_data()
    config = resolve_config("lora", flags={
        "model_name_or_path": str(llm), "vision_tower": str(TINY_VISION), "tokenizer": "demo",
        "random_init": True, "data_path": records, "image_folder": images, "max_steps": 2,
        "per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8,
        "output_dir": str(tmp_path / "run"), "dataloader_num_workers": 0})
    console = Console(record=True, width=200)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        result = run_training(config, Reporter(console))
    assert lora_layers(result.trainer.model) == _expected("gpt_neox")
    assert ("8 linear layers: dense ×2, dense_4h_to_h ×2, dense_h_to_4h ×2, "
            "query_key_value ×2") in console.export_text()
    saved = json.loads((Path(result.output_dir) / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == _expected("gpt_neox")


def test_the_tiny_llama_keeps_its_seven_kinds():
    """The Llama the old pattern was written for: the same 14 layers as before."""
    config = transformers.LlavaConfig(
        vision_config=transformers.AutoConfig.from_pretrained(TINY_VISION),
        text_config=transformers.AutoConfig.from_pretrained(TINY_LLM), image_token_id=IMAGE_ID)
    kinds = {name.split("layers.")[1].split(".", 1)[1]
             for name in lora_targets(transformers.LlavaForConditionalGeneration(config))}
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
