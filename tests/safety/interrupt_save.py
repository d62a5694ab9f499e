"""Run `llava ARGS…` and stop it in the middle of its second checkpoint save: `kill` sends
itself SIGKILL, `interrupt` raises KeyboardInterrupt (Ctrl-C), once the new checkpoint's
weights are written and before its optimizer state is.

Usage: python interrupt_save.py kill|interrupt ARGS…  (test helper; not part of llava)."""

from __future__ import annotations

import os
import signal
import sys

import torch

from llava_cli import cli

MODE = sys.argv[1]
STOP_IN = f"{os.sep}checkpoint-4{os.sep}"  # the second checkpoint (save_steps 2)
_save = torch.save


def _save_then_stop(obj, target, *args, **kwargs):
    # The Trainer's first torch.save into a checkpoint (training_args.bin) follows its weights.
    if STOP_IN in str(target):
        if MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt
    return _save(obj, target, *args, **kwargs)


torch.save = _save_then_stop
sys.argv = ["llava", *sys.argv[2:]]
cli.main()
