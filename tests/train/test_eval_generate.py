"""`--eval-generate QA.json`: eval_accuracy at each evaluation of a real tiny training run, equal
to `llava evaluate` on the saved output; batched answers equal one-at-a-time answers; the QA
file checked before the model loads; the best checkpoint chosen by eval_accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llava_cli.answers.qa_set import answer_questions, read_qa_set
from llava_cli.cli import app
from llava_cli.config.resolve import resolve_config
from llava_cli.demo.shapes import generate_split
from llava_cli.generation.answering_model import load_for_generation
from llava_cli.train.eval_generate import shard
from llava_cli.train.run import run_training
from tests.helpers import PLAIN_SCHEDULE, ROOT, TINY_LLM, TINY_VISION

COMMON = {"per_device_train_batch_size": 2, "learning_rate": 1e-2, "seed": 7,
          "dataloader_num_workers": 0, "eval_generate_max_new_tokens": 6, **PLAIN_SCHEDULE}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The shapes data: pretrain and finetune records, and an eval split as the QA file (its
    records: question, answer, question_type)."""
    root = tmp_path_factory.mktemp("evalgen-data")
    return {kind: generate_split(root / kind, n, 0, kind)
            for kind, n in (("pretrain", 4), ("finetune", 6), ("eval", 3))}


@pytest.fixture(scope="module")
def start(data, tmp_path_factory) -> Path:
    """A tiny finetune output (random-init, pretrain then finetune, 2 steps each), at a low
    rate: its answers still differ from question to question."""
    root = tmp_path_factory.mktemp("evalgen-start")
    with warnings.catch_warnings():  # the random-init warning: expected here
        warnings.simplefilter("ignore", UserWarning)
        pretrain = _train(data, root / "pretrain", "pretrain", model_name_or_path=str(TINY_LLM),
                          vision_tower=str(TINY_VISION), tokenizer="demo", random_init=True,
                          max_steps=2, save_steps=100, learning_rate=1e-4).output_dir
    return _train(data, root / "finetune", "finetune", model_name_or_path=str(pretrain),
                  max_steps=2, save_steps=100, learning_rate=1e-4).output_dir


def _train(data: dict[str, Path], out: Path, stage: str = "finetune", **keys):
    split = data["pretrain" if stage == "pretrain" else "finetune"]
    flags = {**COMMON, "data_path": str(split), "image_folder": str(split.parent),
             "output_dir": str(out), "overwrite": True, **keys}
    return run_training(resolve_config(stage, flags=flags))


def _evaluations(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [row for row in state["log_history"] if "eval_accuracy" in row]


def _evaluate(checkpoint: Path, qa: Path, out: Path, *extra: str) -> tuple[dict, list[str]]:
    result = CliRunner().invoke(app, ["evaluate", str(checkpoint), "--data", str(qa), "-o",
                                      str(out), "--format", "json", *extra])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return json.loads(result.stdout.strip().splitlines()[-1]), [x["prediction"] for x in lines]


def _qa_with_references(path: Path, source: Path, references: list[str]) -> Path:
    """`source`'s QA records with these references (an empty one: a wrong word)."""
    records = json.loads(source.read_text())
    for record, reference in zip(records, references, strict=True):
        record["answer"] = reference or "zebra"
    path.write_text(json.dumps(records))
    return path


def test_shards_cover_every_record_once_in_calls_alike_on_every_rank():
    """Each record counted once over the ranks; every rank's k-th record has images exactly
    when every other rank's has (ZeRO-3: the vision tower runs on all ranks or none)."""
    from llava_cli.answers.qa import QARecord

    for pattern, world in (("IITIIT", 2), ("IT", 4), ("TTTTIIII", 4), ("I", 1), ("TIT", 2)):
        records = [QARecord(str(i), "q", ["a.png"] if kind == "I" else [], ["r"])
                   for i, kind in enumerate(pattern)]
        shards = [shard(records, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1
        for column in zip(*shards, strict=True):
            assert len({bool(records[i].images) for i, _ in column}) == 1
        counted = sorted(i for s in shards for i, keep in s if keep)
        assert counted == list(range(len(pattern)))


def test_batched_answers_equal_one_at_a_time(start, data, tmp_path):
    """Left padding + attention mask: prompts of different lengths, with and without images,
    in one generate call give each the answer it gets alone."""
    folder = data["eval"].parent
    records = json.loads(data["eval"].read_text())
    records.insert(2, {"id": "text", "question": "Say hello to everyone here.", "answer": "hi"})
    records.insert(4, {"id": "short", "question": "Hi?", "answer": "hi"})
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(records))
    qa = read_qa_set(path, folder)
    generator = load_for_generation(start)
    alone = [generator.answer([generator.images.decode(folder / p) for p in r.images] or None,
                              r.question, 6) for r in qa.records]
    assert len(set(alone)) > 1  # answers that differ: a mix-up between rows would show
    for batch_size in (1, 3, len(qa)):
        assert list(answer_questions(generator, qa.records, folder, 6, batch_size)) == alone


def test_eval_accuracy_is_logged_beside_eval_loss_and_equals_llava_evaluate(start, data,
                                                                           tmp_path):
    """The last evaluation (at the last step) scores the saved output's answers: the same
    answers and accuracy as `llava evaluate` on it (batch size 2 there, 3 in training)."""
    qa = data["eval"]
    result = _train(data, tmp_path / "out", model_name_or_path=str(start), max_steps=2,
                    save_steps=2, eval_data_path=str(data["finetune"]),
                    eval_generate=str(qa), per_device_eval_batch_size=3,
                    dataloader_num_workers=1)
    evaluations = _evaluations(result.output_dir)
    assert [row["step"] for row in evaluations] == [2]
    last = evaluations[-1]
    assert "eval_loss" in last  # one log entry: the loss and the accuracy
    groups = {r["question_type"] for r in json.loads(qa.read_text())}
    assert {f"eval_accuracy_{g}" for g in groups} <= set(last)
    metrics, predictions = _evaluate(result.output_dir, qa, tmp_path / "pred.jsonl",
                                     "--batch-size", "2", "--max-new-tokens", "6")
    assert predictions == result.trainer.qa_answers
    assert last["eval_accuracy"] == pytest.approx(metrics["accuracy"])
    for group, row in metrics["groups"].items():
        assert last[f"eval_accuracy_{group}"] == pytest.approx(row["accuracy"])
    saved = (result.output_dir / "llava_config.yaml").read_text()
    assert f"eval_generate: {qa}" in saved


def test_generation_alone_evaluates_and_picks_the_best_checkpoint_by_accuracy(start, data,
                                                                             tmp_path):
    """No held-out records: each evaluation is the answers alone. The references are the
    answers of the step-2 model (a first run, same seed and constant rate), so step 2 scores
    best; load_best_model_at_end (by eval_accuracy, by default here) must end on it."""
    keys = {"model_name_or_path": str(start), "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0}
    first = _train(data, tmp_path / "first", max_steps=2, save_steps=2,
                   eval_generate=str(data["eval"]), **keys)
    qa = _qa_with_references(tmp_path / "qa.json", data["eval"], first.trainer.qa_answers)
    result = _train(data, tmp_path / "out", max_steps=4, save_steps=1, save_total_limit=None,
                    eval_generate=str(qa), eval_generate_image_folder=str(data["eval"].parent),
                    load_best_model_at_end=True, dataloader_num_workers=1, **keys)
    evaluations = _evaluations(result.output_dir)
    assert [row["step"] for row in evaluations] == [1, 2, 3, 4]
    assert not any("eval_loss" in row for row in evaluations)
    accuracy = [row["eval_accuracy"] for row in evaluations]
    assert accuracy[1] == max(accuracy) > 0
    best_step = accuracy.index(max(accuracy)) + 1  # the first best: greater, not equal, wins
    assert best_step != 4 and min(accuracy) < max(accuracy)  # not simply the last, nor all one
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert state["best_metric"] == max(accuracy)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    best = load_file(str(result.output_dir / f"checkpoint-{best_step}" / "model.safetensors"))
    last = load_file(str(result.output_dir / "checkpoint-4" / "model.safetensors"))
    saved = load_file(str(result.output_dir / "model.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert all(torch.equal(saved[k], best[k]) for k in best)  # the output is the best model
    assert result.trainer.model.training  # back in train mode after each evaluation's answers
    from rich.console import Console

    from llava_cli.train.reporting import Reporter

    reporter = Reporter(Console(record=True, width=200))
    trainer = result.trainer
    reporter.summary(resolve_config("finetune", flags={}), "full", {}, trainer.train_dataset,
                     trainer.args)
    shown = " ".join(reporter.console.export_text().split())  # a long path wraps in its cell
    assert "answers evaluated" in shown and "eval_accuracy every 1" in shown


def test_a_bad_qa_record_is_refused_before_the_model_loads(data, tmp_path):
    bad = tmp_path / "qa.json"
    bad.write_text(json.dumps([{"id": "q1", "question": "What?", "answer": "x"},
                               {"id": "q2", "question": "Which?"}]))
    (tmp_path / "no-such-model").mkdir()  # no model in it: loading it would be the error
    flags = {**COMMON, "data_path": str(data["finetune"]),
             "image_folder": str(data["finetune"].parent), "output_dir": str(tmp_path / "out"),
             "model_name_or_path": str(tmp_path / "no-such-model"), "eval_generate": str(bad)}
    with pytest.raises(ValueError, match=r"record 'q2' \(number 1 in .*qa\.json\): no "
                                         "reference answer"):
        run_training(resolve_config("finetune", flags=flags))
    result = CliRunner().invoke(app, [
        "finetune", "--data-path", str(data["finetune"]), "--image-folder",
        str(data["finetune"].parent), "-o", str(tmp_path / "out2"), "--model-name-or-path",
        str(tmp_path / "no-such-model"), "--eval-generate", str(bad)])
    assert result.exit_code == 2, result.output
    assert "no reference answer" in result.stderr and "no-such-model" not in result.stderr


def _two_ranks(start: Path, data: dict[str, Path], out: Path, strategy: str, *extra: str) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                          "torch.distributed.run"]
    command = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "llava_cli",
               "finetune", "--model-name-or-path", str(start), "--data-path",
               str(data["finetune"]), "--image-folder", str(data["finetune"].parent),
               "--batch-size", "2", "--max-steps", "2", "--save-steps", "2", "--lr", "1e-2",
               "--seed", "7", "-o", str(out), *extra]
    if strategy == "zero3":
        command += ["--deepspeed", str(ROOT / "recipes" / "deepspeed" / "zero3.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_ranks_share_the_records_and_log_the_accuracy_of_all(start, data, tmp_path,
                                                                 strategy):
    """torchrun, 2 ranks on gloo (DDP, and DeepSpeed ZeRO-3 with its partitioned weights): the
    records are shared out (3 with images: one rank answers 2, the other 1 and a padding copy;
    1 text-only), the answers gathered. A first run (no --eval-generate, the same training)
    says what the trained model answers; the second run's references are those answers for
    half the records, a wrong word for the rest, so the logged accuracy is known: 0.5, and it
    is `llava evaluate`'s on the saved output."""
    folder = data["eval"].parent
    records = json.loads(data["eval"].read_text())
    records.append({"id": "text", "question": "Say hello.", "answer": "hello",
                    "question_type": "chat"})
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(records))
    _two_ranks(start, data, tmp_path / "first", strategy)
    ask = ("--max-new-tokens", "6", "--image-folder", str(folder))
    _, said = _evaluate(tmp_path / "first", qa, tmp_path / "first.jsonl", *ask)
    for i, (record, answer) in enumerate(zip(records, said, strict=True)):
        record["answer"] = answer if i % 2 == 0 and answer else "zebra"
    qa.write_text(json.dumps(records))
    _two_ranks(start, data, tmp_path / "out", strategy, "--eval-generate", str(qa), "--set",
               f"eval_generate_image_folder={folder}", "--set", "per_device_eval_batch_size=1",
               "--set", "eval_generate_max_new_tokens=6")
    logged = _evaluations(tmp_path / "out")[-1]
    metrics, again = _evaluate(tmp_path / "out", qa, tmp_path / "pred.jsonl", *ask)
    assert again == said  # the same training: the same model
    assert logged["eval_accuracy"] == pytest.approx(metrics["accuracy"])
    assert logged["eval_accuracy"] == pytest.approx(sum(1 for a in said[::2] if a) / len(said))
    assert "eval_accuracy_chat" in logged
    for group, row in metrics["groups"].items():
        assert logged[f"eval_accuracy_{group}"] == pytest.approx(row["accuracy"])
