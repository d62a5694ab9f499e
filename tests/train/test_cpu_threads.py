"""A CPU run picks its intra-op threads by measurement when OMP_NUM_THREADS is not set, keeps
the user's when it is, and says which in the run summary's words."""

from __future__ import annotations

import re

import pytest
import torch

from llava_cli.train.process import choose_cpu_threads


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_unset_threads_are_measured_and_applied(monkeypatch, threads_restored):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    said = choose_cpu_threads(hidden_size=64, workers=0)
    chosen = int(said.split()[0])
    assert torch.get_num_threads() == chosen
    candidates = [int(n) for n in re.search(r"fastest of ([\d, ]+) at", said).group(1)
                  .split(", ")]
    assert chosen in candidates and candidates[0] == 1
    assert "set OMP_NUM_THREADS to choose" in said


def test_workers_leave_their_cores_to_the_workers(monkeypatch, threads_restored):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    said = choose_cpu_threads(hidden_size=64, workers=1)  # 2 cores, 1 worker: 1 thread left
    assert said.startswith("1 of 2 cores") and torch.get_num_threads() == 1


def test_the_users_setting_is_kept(monkeypatch, threads_restored):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert choose_cpu_threads(hidden_size=64, workers=0) == "1 (OMP_NUM_THREADS=1)"
