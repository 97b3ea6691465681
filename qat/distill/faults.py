"""Deterministic crash injection for the crash-safety tests (tests/test_scaling.py): QAT_KILL_AT makes a `qat distill`
process SIGKILL itself at a chosen point, so a test can kill a real run exactly there and resume it.

    QAT_KILL_AT=<point>:<n>[:<rank>]     (rank: only that process of a multi-process run; default every process)
        after_step:<n>    when global step n has updated the weights, before its checkpoint is written
        before_step:<n>   when the step after n is about to start (step n's checkpoint, if any, is on disk)
        checkpoint:<n>    in the middle of this process's n-th checkpoint write: half the bytes are on disk

Unset (always, outside tests) it costs one dictionary lookup per step.
"""
from __future__ import annotations

import io
import os
import signal

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

ENV = "QAT_KILL_AT"


def _target() -> tuple[str, int, int | None] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, n, *rank = spec.split(":")
    return point, int(n), int(rank[0]) if rank else None


def kill_if(point: str, n: int, rank: int) -> None:
    t = _target()
    if t is not None and t[0] == point and t[1] == n and t[2] in (None, rank):
        os.kill(os.getpid(), signal.SIGKILL)


class KillingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO that dies half-way through its n-th write (QAT_KILL_AT=checkpoint:<n>)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.writes = rank, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.writes += 1
        t = _target()
        if t is None or t[0] != "checkpoint" or t[1] != self.writes or t[2] not in (None, self.rank):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        import torch

        torch.save(checkpoint, buf)
        data = buf.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_plugins(rank: int) -> list:
    """Trainer plugins for QAT_KILL_AT=checkpoint:<n> (none otherwise)."""
    t = _target()
    return [KillingCheckpointIO(rank)] if t is not None and t[0] == "checkpoint" else []
