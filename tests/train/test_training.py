"""Training for real on tiny models: pretrain → finetune → LoRA / QLoRA, outputs, reload, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from llava_cli.config.resolve import resolve_config
from llava_cli.inspect.inspection import demo_data
from llava_cli.model.parts import components
from llava_cli.train.run import run_training
from llava_cli.train.stages.supervised import check_command
from tests.helpers import (
    TINY_LLM,
    TINY_VISION,
    demo_run_config,
    demo_run_flags,
    logged_losses,
    start_state,
)
from tests.helpers import eval_logits as _logits
from tests.helpers import probe_batch as _probe

RECORDS, IMAGES = demo_data()
COMMON = demo_run_flags()


@pytest.fixture(scope="module")
def parts() -> dict[str, Path]:
    """Config-only folders of the tiny LLM and vision tower (random-init, as the demo does)."""
    return {"llm": TINY_LLM, "vit": TINY_VISION}


_config = demo_run_config
_start_state = start_state
_losses = logged_losses


@pytest.fixture(scope="module")
def pretrained(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    config = _config("pretrain", out, model_name_or_path=str(parts["llm"]),
                     vision_tower=str(parts["vit"]), tokenizer="demo", random_init=True,
                     skip_bad_records=True, max_steps=6)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        before = _start_state(config)
        result = run_training(config)
    return result, before


def test_pretrain_trains_only_the_projector_and_saves_no_llm_copy(pretrained):
    result, before = pretrained
    after = result.trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert len(changed) == 4  # both linears' weight and bias
    losses = _losses(result.output_dir)
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    files = {p.name for p in result.output_dir.iterdir()}
    assert files == {"projector.safetensors", "llava_run.json", "llava_config.yaml", "base",
                     "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "train_results.json", "all_results.json",
                     "trainer_state.json", "checkpoint-4", "checkpoint-6"}  # save_total_limit 2
    # Checkpoints of a projector run hold the projector, not the frozen model.
    assert (result.output_dir / "checkpoint-4" / "projector.safetensors").is_file()
    assert not list((result.output_dir / "checkpoint-4").glob("model*.safetensors"))
    manifest = json.loads((result.output_dir / "llava_run.json").read_text())
    assert manifest["kind"] == "projector" and manifest["template"] == "plain"
    metrics = json.loads((result.output_dir / "train_results.json").read_text())
    assert metrics["train_samples_per_second"] > 0
    # Two demo records cannot be `plain` samples (skip_bad_records): the text-only one and the
    # multi-turn one. 6 steps of 2 over 5 records meet them in every epoch, in a dataloader
    # worker: still two records.
    assert metrics["dropped_records"] == result.metrics["dropped_records"] == 2


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finetune"
    config = _config("finetune", out, model_name_or_path=str(pretrained[0].output_dir),
                     max_steps=4, projector_lr=3e-3, group_by_modality_length=True)
    before = _start_state(config)
    return run_training(config), before


def test_finetune_from_pretrain_output_reloads_with_stock_transformers(finetuned, pretrained):
    result, before = finetuned
    assert result.metrics["dropped_records"] == 0
    trained = result.trainer.model
    after = trained.state_dict()
    # It started from the pretrain run's projector, and trained everything but the vision tower.
    projector = components(pretrained[0].trainer.model).projector.state_dict()
    assert all(torch.equal(before[f"model.multi_modal_projector.{k}"], v)
               for k, v in projector.items())
    frozen = {k for k in before if torch.equal(before[k], after[k])}
    assert frozen == {k for k in before if k.startswith("model.vision_tower.")}
    losses = _losses(result.output_dir)
    assert losses[-1] < losses[0]
    groups = {g["name"]: g["initial_lr"] for g in result.trainer.optimizer.param_groups}
    assert groups["projector"] == 3e-3 and groups["llm"] == 1e-2
    assert result.trainer.optimizer.param_groups[0]["name"] == "llm"
    # The logged learning_rate is the LLM's (the configured --lr); the projector's beside it.
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    rows = [row for row in state["log_history"] if "loss" in row]
    assert rows[0]["learning_rate"] == 1e-2 and rows[0]["learning_rate_projector"] == 3e-3
    assert all(row["learning_rate_projector"] == pytest.approx(0.3 * row["learning_rate"])
               for row in rows if row["learning_rate"])
    model = transformers.LlavaForConditionalGeneration.from_pretrained(result.output_dir)
    processor = transformers.AutoProcessor.from_pretrained(result.output_dir)
    batch = _probe(processor)
    assert torch.equal(_logits(model, batch), _logits(trained, batch))
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True, tokenize=False).endswith("USER: <image>\nHi ASSISTANT:")


@pytest.mark.parametrize("bits", [16, 4, 8])
def test_lora_and_qlora_adapters(finetuned, tmp_path, bits):
    from peft import PeftModel

    base_dir = finetuned[0].output_dir
    one_record = tmp_path / "one.json"  # every step sees the same sample: the loss must fall
    one_record.write_text(json.dumps(json.loads(Path(RECORDS).read_text())[:1]))
    config = _config("lora", tmp_path / "lora", model_name_or_path=str(base_dir), max_steps=4,
                     lora_r=8, lora_alpha=16, bits=bits, learning_rate=5e-3,
                     data_path=str(one_record))
    result = run_training(config)
    trained = result.trainer.model
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or "multi_modal_projector.modules_to_save" in n
                         for n in names)
    assert not any("vision_tower" in n and "lora_" in n for n in names)
    losses = _losses(result.output_dir)
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    files = {p.name for p in result.output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "llava_run.json"} <= files
    assert not files & {"model.safetensors", "non_lora_trainables.bin"}
    manifest = json.loads((result.output_dir / "llava_run.json").read_text())
    assert manifest["kind"] == "lora" and manifest["base"]["path"] == str(base_dir.resolve())
    if bits == 16:  # the adapter loads on the stock base with PEFT and gives the same logits
        base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir)
        reloaded = PeftModel.from_pretrained(base, result.output_dir)
        batch = _probe(transformers.AutoProcessor.from_pretrained(result.output_dir))
        assert torch.allclose(_logits(reloaded, batch), _logits(trained, batch), atol=1e-6)


def test_resume_ends_with_the_uninterrupted_weights(finetuned, tmp_path):
    base_dir = str(finetuned[0].output_dir)
    whole = run_training(_config("finetune", tmp_path / "whole", model_name_or_path=base_dir,
                                 max_steps=4))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run_training(_config("finetune", resumed_dir, model_name_or_path=base_dir,
                                   max_steps=4, resume="latest"))
    assert resumed.trainer.state.global_step == 4
    # Steps 1-2 come from the checkpoint's history; 3-4 were trained again, identically.
    assert _losses(resumed.output_dir) == _losses(whole.output_dir)
    a, b = whole.trainer.model.state_dict(), resumed.trainer.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_non_empty_output_dir(finetuned, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    config = resolve_config("finetune", flags={**COMMON, "overwrite": False,
                                               "output_dir": str(tmp_path / "out"),
                                               "model_name_or_path": str(finetuned[0].output_dir)})
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        run_training(config)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_real_llama2_tokenizer_trains_one_step(assets, parts, tmp_path):
    llm = tmp_path / "llm32k"
    transformers.LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2).save_pretrained(llm)
    config = _config("finetune", tmp_path / "out", model_name_or_path=str(llm),
                     vision_tower=str(parts["vit"]), random_init=True, max_steps=1,
                     tokenizer=str(assets / "tokenizers" / "llama2-vicuna-v1.5"))
    with pytest.warns(UserWarning, match="RANDOM weights"):
        result = run_training(config)
    assert torch.isfinite(torch.tensor(_losses(result.output_dir))).all()
    assert result.trainer.model.config.image_token_id == 32000


def test_lora_keeps_the_base_frozen_and_resumes_exactly(finetuned, tmp_path):
    base_dir = str(finetuned[0].output_dir)

    def config(out, **keys):
        return _config("lora", out, model_name_or_path=base_dir, max_steps=4, lora_r=8,
                       lora_alpha=16, learning_rate=5e-3, dataloader_num_workers=0, **keys)
    # No worker: with LoRA dropout AND dataloader workers, the resumed run draws different
    # dropout masks than the uninterrupted one (the Trainer's RNG restore vs the workers'
    # start-up); the weights are restored all the same (full-run resume test: workers on).

    whole = run_training(config(tmp_path / "whole"))
    base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir).state_dict()
    trained = whole.trainer.model.state_dict()
    changed = set()
    for name, tensor in trained.items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        plain = (name.removeprefix("base_model.model.").replace(".base_layer", "")
                 .replace(".original_module", ""))
        assert torch.equal(tensor, base[plain]), name  # every base weight untouched
    for name, tensor in trained.items():
        if "modules_to_save" in name:
            plain = name.removeprefix("base_model.model.").replace(".modules_to_save.default",
                                                                   "")
            if not torch.equal(tensor, base[plain]):
                changed.add(plain)
    assert changed == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2)
                       for p in ("weight", "bias")}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run_training(config(resumed_dir, resume="latest"))
    assert resumed.trainer.state.global_step == 4
    again = resumed.trainer.model.state_dict()
    assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_lora_with_an_unfrozen_vision_tower_saves_the_tower_in_the_adapter(finetuned, tmp_path):
    from peft import PeftModel

    base_dir = finetuned[0].output_dir
    result = run_training(_config("lora", tmp_path / "lora", model_name_or_path=str(base_dir),
                                  max_steps=2, lora_r=8, lora_alpha=16,
                                  train_vision_tower="full"))
    base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir)
    reloaded = PeftModel.from_pretrained(base, result.output_dir)
    batch = _probe(transformers.AutoProcessor.from_pretrained(result.output_dir))
    assert torch.allclose(_logits(reloaded, batch), _logits(result.trainer.model, batch),
                          atol=1e-6)
    fresh = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir)
    assert not torch.allclose(_logits(fresh, batch), _logits(reloaded, batch))


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank gloo process group, as torchrun's ranks have (destroyed if a test fails)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_cli_destroys_the_process_group_when_a_run_ends(one_rank_group, finetuned, tmp_path):
    """Left to interpreter shutdown, a gloo group can abort a finished rank (exit -6)."""
    from llava_cli.commands.train import run_or_exit
    from llava_cli.train.process import process_group_closed_at_end

    with process_group_closed_at_end():
        one_rank_group.all_reduce(torch.ones(1))  # the group is in use inside the block
    assert not one_rank_group.is_initialized()

    one_rank_group.init_process_group("gloo", init_method=f"file://{tmp_path / 'again'}",
                                      rank=0, world_size=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    config = _config("finetune", tmp_path / "out", overwrite=False,
                     model_name_or_path=str(finetuned[0].output_dir))
    with pytest.raises(ValueError, match="is not empty"):  # a refused run ends the same way
        run_or_exit("finetune", config)  # (the command boundary prints it, exit 2)
    assert not one_rank_group.is_initialized()


def test_the_dropped_records_total_is_logged_once_on_rank_zero(caplog):
    from llava_cli.data.problems import Dropped, ProblemCounter
    from llava_cli.train.reporting import report_dropped

    class Finished:  # what report_dropped asks of the trainer
        def __init__(self, rank_zero: bool, *drops: Dropped) -> None:
            self.rank_zero, self.drops = rank_zero, drops

        def dropped_records(self) -> ProblemCounter:
            return ProblemCounter.of_distinct(self.drops)

        def is_world_process_zero(self) -> bool:
            return self.rank_zero

    drops = (Dropped(3, "fully-masked", "long"), Dropped(3, "fully-masked", "long"),
             Dropped(7, "bad-image", "gone"))
    with caplog.at_level("WARNING", logger="llava_cli"):
        assert report_dropped(Finished(False, *drops)) == 2
        assert not caplog.records
        assert report_dropped(Finished(True)) == 0
        assert not caplog.records
        assert report_dropped(Finished(True, *drops)) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "2 record(s) were dropped from training and never trained on: fully-masked: 1 (e.g. "
        "long); bad-image: 1 (e.g. gone). `llava inspect-data --check` on the data lists them "
        "all."]


def _dropped_on_rank(rank: int, rendezvous: str, queue) -> None:  # a forked rank's body
    import torch.distributed as dist

    from llava_cli.data.problems import Dropped
    from llava_cli.train.trainer import LlavaTrainer

    class Rank:  # the trainer state dropped_records reads
        _dropped = ({3: Dropped(3, "fully-masked", "long"), 8: Dropped(8, "bad-image", "gone")}
                    if rank == 0 else {8: Dropped(8, "bad-image", "gone"),
                                       5: Dropped(5, "bad-json", "#5")})

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        counter = LlavaTrainer.dropped_records(Rank())
        queue.put((rank, counter.total, dict(counter.counts)))
    finally:
        dist.destroy_process_group()


def test_dropped_records_are_totalled_over_ranks(tmp_path):
    """Each rank drops what its share of the data holds; every rank gets the distinct total."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    ranks = [context.Process(target=_dropped_on_rank,
                             args=(rank, f"file://{tmp_path / 'rendezvous'}", queue))
             for rank in (0, 1)]
    for process in ranks:
        process.start()
    results = sorted(queue.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    expected = {"fully-masked": 1, "bad-image": 1, "bad-json": 1}
    assert results == [(0, 3, expected), (1, 3, expected)]
    assert [process.exitcode for process in ranks] == [0, 0]


def test_held_out_records_give_the_eval_loss_at_each_save(finetuned, tmp_path):
    config = _config("finetune", tmp_path / "out", model_name_or_path=str(finetuned[0].output_dir),
                     max_steps=4, save_steps=2, eval_data_path=RECORDS,
                     per_device_eval_batch_size=5, dataloader_num_workers=0)
    result = run_training(config)
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    evaluations = [row for row in state["log_history"] if "eval_loss" in row]
    assert [row["step"] for row in evaluations] == [2, 4]  # evaluated at every save
    # The last one is the trained model's loss on all 5 records (one batch), computed here the
    # plain way: full logits, transformers' own loss.
    trainer = result.trainer
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(5)])
    model = trainer.model.eval()
    with torch.no_grad():
        loss = model(**batch).loss
    assert evaluations[-1]["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert evaluations[0]["eval_loss"] != evaluations[-1]["eval_loss"]
    saved = (result.output_dir / "llava_config.yaml").read_text()
    assert f"eval_data_path: {RECORDS}" in saved
    from rich.console import Console

    from llava_cli.train.reporting import Reporter

    reporter = Reporter(Console(record=True, width=120))
    reporter.summary(config, "full", {}, trainer.train_dataset, trainer.args, trainer.eval_dataset)
    shown = reporter.console.export_text()
    assert "│ evaluation              │ 5 records, eval_loss every 2 steps" in shown


def test_evaluation_needs_held_out_records_and_defaults_to_the_save_schedule(tmp_path):
    from llava_cli.train.arguments import to_training_arguments

    for asked, named in (({"eval_strategy": "steps"}, "eval_strategy 'steps'"),
                         ({"do_eval": True}, "do_eval")):
        config = resolve_config("finetune", flags=asked)
        with pytest.raises(ValueError, match=f"{named} needs held-out records to evaluate on: "
                                             r"give --eval-data-path FILE\.json"):
            to_training_arguments(config, str(tmp_path))
    args = to_training_arguments(resolve_config("finetune", flags={
        "eval_data_path": RECORDS, "save_steps": 50}), str(tmp_path))
    assert (args.eval_strategy, args.eval_steps, args.prediction_loss_only) == ("steps", 50, True)
    # the eval batch follows the train batch: finetune's default, LLaVA-1.5's 16
    assert args.per_device_eval_batch_size == args.per_device_train_batch_size == 16
    for saves, evaluations in (("epoch", "epoch"), ("no", "epoch"), ("best", "steps")):
        args = to_training_arguments(resolve_config("finetune", flags={
            "eval_data_path": RECORDS, "save_strategy": saves, "per_device_train_batch_size": 2}),
            str(tmp_path))
        assert (args.eval_strategy, args.per_device_eval_batch_size) == (evaluations, 2), saves
    args = to_training_arguments(resolve_config("finetune", flags={
        "eval_data_path": RECORDS, "eval_strategy": "steps", "eval_steps": 7}), str(tmp_path))
    assert (args.eval_strategy, args.eval_steps) == ("steps", 7)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "lora"])
def test_load_best_model_at_end_really_loads_the_best_checkpoint(pretrained, finetuned, tmp_path,
                                                                  stage):
    """transformers' own loader misses LLaVA's on-disk key names (full runs) and projector-only
    checkpoints, and silently keeps the last weights. "Best" is made the highest eval loss
    here (greater_is_better), so it is the first checkpoint, not the last."""
    from safetensors.torch import load_file

    start = (pretrained if stage == "pretrain" else finetuned)[0].output_dir
    extra: dict = {"model_name_or_path": str(start)}
    if stage == "pretrain":  # the plain template cannot take the text-only / multi-turn ones
        extra.update(skip_bad_records=True)
    if stage == "lora":
        extra.update(lora_r=8, lora_alpha=16, learning_rate=5e-3)
    config = _config(stage, tmp_path / "out", max_steps=4, save_steps=2, eval_data_path=RECORDS,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss",
                     greater_is_better=True, dataloader_num_workers=0, **extra)
    result = run_training(config)
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    weights = {"pretrain": "projector.safetensors", "finetune": "model.safetensors",
               "lora": "adapter_model.safetensors"}[stage]
    best = load_file(str(result.output_dir / "checkpoint-2" / weights))
    last = load_file(str(result.output_dir / "checkpoint-4" / weights))
    saved = load_file(str(result.output_dir / weights))
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert all(torch.equal(saved[k], best[k]) for k in best)  # the output is the best model


def test_group_by_length_takes_the_lengths_from_the_index(finetuned, tmp_path, monkeypatch):
    """transformers' own group_by_length loads every sample to measure it before training (and
    measures LLaVA's by "pixel_values": a KeyError), held-out ones too."""
    from llava_cli.data.batching.sampler import ModalityLengthGroupedSampler
    from llava_cli.data.dataset import LazySupervisedDataset

    loaded: list[int] = []
    original = LazySupervisedDataset.__getitem__
    monkeypatch.setattr(LazySupervisedDataset, "__getitem__",
                        lambda self, i: loaded.append(int(i)) or original(self, i))

    def one_step(strategy: str) -> tuple[int, Any]:
        loaded.clear()
        config = _config("finetune", tmp_path / strategy, max_steps=1,
                         model_name_or_path=str(finetuned[0].output_dir),
                         train_sampling_strategy=strategy, dataloader_num_workers=0,
                         eval_data_path=RECORDS, eval_strategy="no")
        result = run_training(config)
        return len(loaded), result

    random_loads, _ = one_step("random")
    grouped_loads, result = one_step("group_by_length")
    # Only what the step reads (transformers' own would first load all 5 records to measure).
    assert 0 < grouped_loads == random_loads < len(result.trainer.train_dataset)
    trainer = result.trainer
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler)
    assert sampler.lengths.tolist() == trainer.train_dataset.lengths.tolist()
    assert sorted(sampler) == list(range(5))  # every record once per epoch
    loaded.clear()  # evaluation: nothing loaded but the held-out records, once each
    assert trainer.evaluate()["eval_loss"] > 0
    assert sorted(loaded) == list(range(5))


def test_batch_rebalance_is_refused_for_what_it_would_load(tmp_path):
    from llava_cli.train.arguments import to_training_arguments

    config = resolve_config("finetune", flags={"train_sampling_strategy": "batch_rebalance"})
    with pytest.raises(ValueError, match="'batch_rebalance' measures every sample by loading it"):
        to_training_arguments(config, str(tmp_path))


def test_held_out_records_are_checked_before_training(finetuned, tmp_path, caplog):
    """A bad held-out record would stop the run at its first evaluation, before that step's
    checkpoint is written; it is found before the first step instead."""
    records = json.loads(Path(RECORDS).read_text())
    records.append({"id": "gone", "image": "images/nowhere.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]})
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(records))
    keys = {"model_name_or_path": str(finetuned[0].output_dir), "max_steps": 2,
            "save_steps": 2, "eval_data_path": str(held_out), "dataloader_num_workers": 0}
    config = _config("finetune", tmp_path / "refused", **keys)
    with pytest.raises(ValueError) as refused:
        run_training(config)
    missing = Path(RECORDS).resolve().parent / "images" / "nowhere.png"
    assert str(refused.value) == (
        f"held-out data {held_out}: 1 of 6 record(s) cannot be evaluated (bad-image: 1 (e.g. "
        f"gone)); fix them or pass --skip-bad-records. The first: record 'gone': image "
        f"'images/nowhere.png' (resolved to {missing}): file not found. "
        f"`{check_command(config, str(held_out), held_out=True)}` lists them all")
    assert not list((tmp_path / "refused").glob("checkpoint-*"))

    with caplog.at_level("WARNING", logger="llava_cli"):
        result = run_training(_config("finetune", tmp_path / "skipped", skip_bad_records=True,
                                      **keys))
    assert (f"held-out data {held_out}: 1 record(s) cannot be evaluated and are replaced by the "
            "next one (bad-image: 1 (e.g. gone))") in caplog.text
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert [row["step"] for row in state["log_history"] if "eval_loss" in row] == [2]
