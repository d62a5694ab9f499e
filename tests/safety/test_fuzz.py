"""Fuzzing the two inputs users write by hand: `--set KEY=VALUE` and LLaVA records (as parsed
records, as samples, and as whole JSON files). Only named errors, ever: a `ValueError` with a
message (ConfigError, RecordError, ImageError, RecordFormatError are all ValueErrors)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import RunConfig
from llava_cli.data.records import RecordIndex
from llava_cli.train.arguments import argument_values

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

KEYS = sorted(RunConfig.model_fields) + [
    "learning_rate", "num_train_epochs", "max_steps", "gradient_accumulation_steps",
    "per_device_train_batch_size", "save_steps", "logging_steps", "warmup_steps",
    "lr_scheduler_type", "deepspeed", "report_to", "bf16", "seed", "eval_strategy",
    "dataloader_num_workers", "optim", "weight_decay", "max_grad_norm", "fsdp"]
TRICKY = ["0", "-1", "1e999", "nan", "inf", "-0.0", "true", "False", "null", "~", "[]",
          "[1, 2]", "{a: 1}", "{", "'", "\"", "1_000", "0x10", "2**64",
          "99999999999999999999999", "*anchor", "&a x", "!!python/object:os.system",
          "<<: {a: 1}", "- x", "yes", "on", "none", "latest", "", " ", "\t", "é", "\x00"]
VALUES = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12),
                   st.integers(-10**20, 10**20).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


def _only_named(call) -> None:
    try:
        call()
    except ValueError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"


@FUZZ
@given(key=st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10)),
       value=VALUES)
def test_set_values_give_a_config_or_a_named_error(key, value):
    def resolve_and_map():
        config = resolve_config("finetune", sets=[f"{key}={value}"],
                                flags={"output_dir": "/tmp/llava-fuzz-out"})
        argument_values(config, "/tmp/llava-fuzz-out", on_cpu=True, workers=0)
    _only_named(resolve_and_map)


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=8), st.sampled_from(["<image>", "<image>\nhi", ""]))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
TURN = st.fixed_dictionaries({}, optional={
    "from": st.one_of(st.sampled_from(["human", "gpt", "system", "user", "assistant", "x"]),
                      JSON),
    "value": st.one_of(st.sampled_from(["<image>\nWhat?", "hi", "", "<image><image>"]), JSON)})
RECORD = st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "id": JSON, "image": st.one_of(st.sampled_from(["a.png", "../x.png", "/etc/passwd"]), JSON),
    "conversations": st.one_of(st.lists(TURN, max_size=5), JSON)}))


@FUZZ
@given(record=RECORD, position=st.integers(0, 10**6))
def test_records_give_a_sample_or_a_named_error(record, position, demo_builder):
    _only_named(lambda: demo_builder.build(record, position, load_images=False))
    _only_named(lambda: demo_builder.build(record, position, load_images=True))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=JSON)
def test_data_files_give_an_index_or_a_named_error(top, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-data")
    path = Path(folder) / "data.json"
    path.write_text(json.dumps(top))
    _only_named(lambda: RecordIndex.open(path, cache_dir=folder / "cache"))
