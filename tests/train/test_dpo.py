"""`llava dpo` on a tiny model trained and saved here (pretrain → finetune, reloaded with
`from_pretrained`), on non-square shape pictures and a text-only pair:

- the objective equals an independent implementation of the DPO / IPO / RPO formulas, loss
  and gradient;
- reply log-probs from one image encoding per pair equal the plain full-logits computation
  with every row's images passed again (values and gradients), and the tower runs once;
- the reference stays frozen; the LoRA disabled-adapter reference equals a separate frozen
  copy; precomputed reference log-probs give the live reference's losses;
- resume is bit-exact; the outputs serve (manifest, merge-lora, stock from_pretrained).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.config.resolve import resolve_config
from llava_cli.demo.shapes import generate_split
from llava_cli.train.dpo.objective import PreferenceObjective, ReplyLogProbs
from llava_cli.train.dpo.pair_forward import encode_images, reply_forward
from llava_cli.train.dpo.reference_policy import COPY, DISABLED_ADAPTER, Reference
from llava_cli.train.run import run_training
from llava_cli.train.stages import preference
from tests.helpers import PLAIN_SCHEDULE

TEXT_PAIR = {"id": "chat-pair", "conversations": [
    {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."},
    {"from": "human", "value": "What can you do?"}],
    "chosen": "I answer questions about pictures.", "rejected": "Nothing at all."}


@pytest.fixture(scope="module")
def base(tiny_finetune, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny finetune output (random-init model, 2 steps per stage) and preference
    data: 4 shape pairs (non-square pictures) and a multi-turn text-only pair."""
    root = tmp_path_factory.mktemp("dpo")
    model = tiny_finetune
    pairs = generate_split(root / "dpo", 4, 0, "dpo")
    records = json.loads(pairs.read_text())
    pairs.write_text(json.dumps([*records[:2], TEXT_PAIR, *records[2:]]))
    return {"root": root, "model": model, "data": pairs}


def _flags(base: dict[str, Path], out: str, **keys) -> dict:
    return {"model_name_or_path": str(base["model"]), "data_path": str(base["data"]),
            "image_folder": str(base["data"].parent), "output_dir": str(base["root"] / out),
            "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3,
            "logging_steps": 1, "save_steps": 100, "seed": 3, "dataloader_num_workers": 0,
            "overwrite": True, **PLAIN_SCHEDULE, **keys}


def _batch(base: dict[str, Path], model, processor, positions=(0, 2, 1)):
    config = resolve_config("dpo", flags=_flags(base, "unused"))
    dataset, _ = preference.datasets(config, model, processor)
    return preference.collator(config, processor)([dataset[i] for i in positions])


def _loaded(path: Path):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    return model, transformers.AutoProcessor.from_pretrained(path)


# --- the objective against the formulas ------------------------------------------------------

def _independent_loss(pc, pr, rc, rr, beta, kind, nll=None, alpha=None, lengths=None):
    """DPO / IPO / RPO per pair, written from the papers (plain floats)."""
    losses = []
    for i in range(len(pc)):
        if kind == "ipo":
            n_c, n_r = lengths[i]
            h = (pc[i] / n_c - rc[i] / n_c) - (pr[i] / n_r - rr[i] / n_r)
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            h = (pc[i] - rc[i]) - (pr[i] - rr[i])
            losses.append(math.log1p(math.exp(-beta * h)))  # -log sigmoid(beta h)
    loss = sum(losses) / len(losses)
    return loss + (alpha * nll if alpha is not None else 0.0)


@pytest.mark.parametrize(("kind", "alpha"), [("sigmoid", None), ("ipo", None),
                                             ("sigmoid", 0.7)])
def test_objective_equals_the_formulas_loss_and_gradient(kind, alpha):
    torch.manual_seed(0)
    sums = torch.randn(6, dtype=torch.float64, requires_grad=True)  # 3 pairs: chosen, rejected
    tokens = torch.tensor([2, 5, 1, 3, 4, 2])
    reference = torch.randn(6, dtype=torch.float64)
    nll = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    beta = 0.25
    objective = PreferenceObjective(beta, kind, alpha)
    policy = ReplyLogProbs(sums, tokens, nll if alpha is not None else None)
    loss, stats = objective(policy, ReplyLogProbs(reference, tokens))
    loss.backward()

    def independent(values):
        pc, pr = values[:3], values[3:]
        return _independent_loss(pc, pr, reference[:3].tolist(), reference[3:].tolist(), beta,
                                 kind, nll.item(), alpha,
                                 list(zip(tokens[:3].tolist(), tokens[3:].tolist(),
                                          strict=True)))

    values = sums.detach().tolist()
    assert loss.item() == pytest.approx(independent(values), rel=1e-12)
    step = 1e-6  # central differences of the independent formula: its gradient
    for i in range(6):
        up, down = list(values), list(values)
        up[i] += step
        down[i] -= step
        numeric = (independent(up) - independent(down)) / (2 * step)
        assert sums.grad[i].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    if alpha is not None:
        assert nll.grad.item() == pytest.approx(alpha)
    # TRL's rewards: beta × the summed log-ratios, for every loss type
    ratio_c = sums.detach()[:3] - reference[:3]
    ratio_r = sums.detach()[3:] - reference[3:]
    torch.testing.assert_close(stats["rewards/chosen"], beta * ratio_c)
    torch.testing.assert_close(stats["rewards/margins"], beta * (ratio_c - ratio_r))
    torch.testing.assert_close(stats["rewards/accuracies"], (ratio_c > ratio_r).float())


def test_objective_refuses_bad_settings():
    with pytest.raises(ValueError, match="beta"):
        PreferenceObjective(0.0)
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceObjective(0.1, "hinge")


# --- log-probs from one encoding per pair ----------------------------------------------------

def _full_logits_log_probs(model, batch):
    """The plain way: every row with its own images, full logits, log_softmax, gather."""
    pixels = batch["pixel_values"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=torch.cat([pixels, pixels]), use_cache=False).logits.float()
    labels = batch["labels"]
    logps = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = torch.gather(logps, 2, target.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1), mask.sum(-1)


def test_one_image_encoding_per_pair_gives_the_plain_log_probs_and_gradients(base):
    model, processor = _loaded(base["model"])
    model.train()
    batch = _batch(base, model, processor)
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 2
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    ours = reply_forward(model, batch, encode_images(model, batch))
    assert len(calls) == 1  # the tower ran once for the 2 images of 3 pairs
    hook.remove()
    ours.sums.sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sums, tokens = _full_logits_log_probs(model, batch)
    sums.sum().backward()
    torch.testing.assert_close(ours.sums, sums, rtol=1e-5, atol=1e-5)
    assert ours.tokens.tolist() == tokens.tolist()
    assert any("multi_modal_projector" in n for n in ours_grads)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_only_the_replies_are_scored(base):
    model, processor = _loaded(base["model"])
    batch = _batch(base, model, processor, positions=(2,))  # the multi-turn text-only pair
    tokenizer = processor.tokenizer
    for row, reply in ((0, TEXT_PAIR["chosen"]), (1, TEXT_PAIR["rejected"])):
        labels = batch["labels"][row]
        scored = tokenizer.decode(labels[labels != -100])
        # the reply and its end of turn; the context's earlier reply ("Hi.") is not scored
        assert scored.strip() == reply + tokenizer.eos_token
    prompt = batch["labels"][0] == -100
    same = batch["input_ids"][0][: int(prompt.sum()) - 1]
    assert torch.equal(same, batch["input_ids"][1][: len(same)])  # one prompt, two replies


# --- the reference --------------------------------------------------------------------------

def test_disabled_adapter_reference_equals_a_separate_frozen_copy(base):
    from peft import LoraConfig, get_peft_model

    model, processor = _loaded(base["model"])
    batch = _batch(base, model, processor)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # adapters that change the answers
    copy, _ = _loaded(base["model"])
    disabled = Reference(DISABLED_ADAPTER).log_probs(peft, batch)
    frozen = Reference(COPY, copy.eval()).log_probs(peft, batch)
    adapted = reply_forward(peft, batch, encode_images(peft, batch))
    torch.testing.assert_close(disabled.sums, frozen.sums, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(adapted.sums, frozen.sums, atol=1e-3)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_full_dpo_trains_the_llm_against_a_frozen_reference(base):
    result = run_training(resolve_config("dpo", flags=_flags(base, "full")))
    trainer = result.trainer
    start, trained = _weights(base["model"]), _weights(result.output_dir)
    reference = {f"model.{k}" if not k.startswith("lm_head") else k: v
                 for k, v in trainer.reference.model.state_dict().items()}
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert changed and all("language_model" in k or "lm_head" in k for k in changed)
    for key, value in start.items():  # the reference is the starting model, untouched
        stored = reference.get(key.replace("model.language_model", "model.language_model"))
        if stored is not None:
            torch.testing.assert_close(stored, value, rtol=0, atol=0)
    history = json.loads((result.output_dir / "trainer_state.json").read_text()) \
        if (result.output_dir / "trainer_state.json").is_file() else None
    logs = trainer.state.log_history if history is None else history["log_history"]
    step = next(entry for entry in logs if "loss" in entry)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert name in step
    assert step["rewards/chosen"] == 0 and step["loss"] == pytest.approx(math.log(2), abs=1e-4)
    saved = json.loads((result.output_dir / "llava_run.json").read_text()) \
        if (result.output_dir / "llava_run.json").is_file() else None
    assert saved is None or saved["kind"] == "full"
    config = (result.output_dir / "llava_config.yaml").read_text()
    assert "objective: dpo" in config and "beta: 0.1" in config
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(result.output_dir)
    assert reloaded.config.image_token_id == trainer.model.config.image_token_id


def _losses(output: Path, trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_precomputed_reference_gives_the_live_references_losses(base):
    live = run_training(resolve_config("dpo", flags=_flags(
        base, "live", train_llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)))
    pre = run_training(resolve_config("dpo", flags=_flags(
        base, "pre", train_llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
        precompute_ref_log_probs=True)))
    assert pre.trainer.reference.tables["train"].shape == (5, 4)
    assert _losses(pre.output_dir, pre.trainer) == pytest.approx(
        _losses(live.output_dir, live.trainer), rel=1e-5)
    assert (live.output_dir / "adapter_model.safetensors").is_file()


def test_resume_is_bit_exact(base):
    keys = {"train_llm": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "max_steps": 4, "save_steps": 2}
    whole = run_training(resolve_config("dpo", flags=_flags(base, "whole", **keys)))
    halves = base["root"] / "halves"  # as if the run had stopped after its checkpoint at 2
    shutil.copytree(whole.output_dir / "checkpoint-2", halves / "checkpoint-2")
    resumed = run_training(resolve_config("dpo", flags=_flags(
        base, "halves", **keys, resume="latest", overwrite=False)))
    assert resumed.trainer.state.global_step == 4
    first = load_file(whole.output_dir / "adapter_model.safetensors")
    second = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    tail = [e["loss"] for e in resumed.trainer.state.log_history if "loss" in e][-2:]
    assert tail == [e["loss"] for e in whole.trainer.state.log_history if "loss" in e][-2:]


def test_dpo_lora_output_merges_and_answers(base, tmp_path):
    from llava_cli.generation.answering_model import load_for_generation
    from llava_cli.merge.merge import merge_lora

    run = run_training(resolve_config("dpo", flags=_flags(
        base, "served", train_llm="lora", lora_r=4, lora_alpha=8)))
    merged = merge_lora(run.output_dir, tmp_path / "merged")
    assert merged is not None
    stock = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert stock is not None
    generator = load_for_generation(run.output_dir)
    picture = base["data"].parent / json.loads(base["data"].read_text())[0]["image"]
    assert isinstance(generator.answer(str(picture), "What shape is it?", max_new_tokens=3),
                      str)


# --- the command line ------------------------------------------------------------------------

def test_command_line_as_the_readme_shows(base):
    out = base["root"] / "cli"
    result = CliRunner().invoke(app, [
        "dpo", "--model-name-or-path", str(base["model"]), "--data-path", str(base["data"]),
        "--image-folder", str(base["data"].parent), "--lora", "--lora-r", "4",
        "--beta", "0.2", "--max-steps", "1", "--batch-size", "2", "--output-dir", str(out),
        "--set", "dataloader_num_workers=0"])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()
    assert "beta: 0.2" in (out / "llava_config.yaml").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["finetune", "--beta", "0.3"], "use llava dpo"),
    (["dpo", "--beta", "0", "--model-name-or-path", "x", "--data-path", "y"], "beta"),
    (["dpo", "--reference", "disabled-adapter", "--model-name-or-path", "x",
      "--data-path", "y"], "add --lora"),
    (["dpo", "--packing", "on", "--model-name-or-path", "x", "--data-path", "y"], "packing"),
])
def test_bad_settings_are_one_line(argv, message):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_dpo_trains_the_adapter_against_the_quantized_base(base, bits):
    """QLoRA: the reference is the quantized base with the adapters off (no copy)."""
    run = run_training(resolve_config("dpo", flags=_flags(
        base, f"qlora{bits}", train_llm="lora", lora_r=4, lora_alpha=8, bits=bits,
        max_steps=2)))
    assert run.trainer.reference.model is None
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-3)
    adapter = load_file(run.output_dir / "adapter_model.safetensors")
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in adapter.items())


def test_held_out_pairs_log_eval_rewards_for_best_model_selection(base):
    run = run_training(resolve_config("dpo", flags=_flags(
        base, "evaluated", train_llm="lora", lora_r=4, lora_alpha=8, max_steps=2,
        eval_data_path=str(base["data"]), save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="eval_rewards/accuracies", dataloader_num_workers=1)))
    evaluations = [e for e in run.trainer.state.log_history if "eval_loss" in e]
    assert len(evaluations) == 2
    for entry in evaluations:
        assert {"eval_rewards/accuracies", "eval_rewards/margins",
                "eval_logps/chosen"} <= set(entry)
        assert "rewards/chosen" not in entry  # training statistics: training logs only
    assert run.trainer.state.best_model_checkpoint is not None


def test_each_stage_refuses_the_other_kind_of_record_before_loading(base, tmp_path):
    supervised = tmp_path / "sft.json"
    supervised.write_text(json.dumps([{"id": "plain", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]))
    with pytest.raises(ValueError, match="train supervised records with llava finetune"):
        run_training(resolve_config("dpo", flags=_flags(base, "kind1",
                                                        data_path=str(supervised))))
    flags = _flags(base, "kind2")
    flags.pop("overwrite")
    with pytest.raises(ValueError, match="train preference records with llava dpo"):
        run_training(resolve_config("finetune", flags=flags))
    assert not (base["root"] / "kind2").exists()


def test_dpo_starts_from_an_original_llava_checkpoint_on_real_photos(assets, tmp_path):
    """The original code's own full checkpoint (converted on the fly) as policy and
    reference, on non-square real photos."""
    pairs = [{"id": f"photo-{n}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat animal is this?"}],
        "chosen": "A cat.", "rejected": "A dog."}
        for n, image in enumerate(["chelsea_cat.png", "cat_tall_500x666.webp"])]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs))
    run = run_training(resolve_config("dpo", flags={
        "model_name_or_path": str(assets / "original-llava" / "full"),
        "data_path": str(data), "image_folder": str(assets / "images"),
        "output_dir": str(tmp_path / "out"), "train_llm": "lora", "lora_r": 4,
        "lora_alpha": 8, "per_device_train_batch_size": 2, "max_steps": 2,
        "learning_rate": 1e-3, "logging_steps": 1, "dataloader_num_workers": 1}))
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and len(losses) == 2
    manifest = json.loads((run.output_dir / "llava_run.json").read_text())
    assert manifest["kind"] == "lora"
