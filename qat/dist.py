"""Collectives of a multi-process run (`qat distill` on N processes / nodes), over the default process group that
Lightning's strategy set up; in a single process every call is a no-op, so the code that uses them has one path.

Lightning's `strategy.reduce` is not used for the per-step work: it puts a barrier before every all-reduce (one
more round trip per call). Everything here is plain torch.distributed on the group Lightning initialised (gloo on
CPU, nccl on GPU), so qat.ptq and qat.eval stay free of Lightning.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

BUCKET_BYTES = 32 * 2**20  # gradients are averaged in flat buckets of about this size (DDP uses 25 MB)


def comm_error_text(e: BaseException) -> str:
    """The useful part of a gloo/nccl error: its first line without the source location and the generic advice."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)
    return first.split(". This is typically")[0].rstrip(".")


def is_comm_failure(e: BaseException) -> bool:
    """An error of the process group itself (a peer died or timed out), not of the work around it."""
    if isinstance(e, (LostPeerError, getattr(dist, "DistError", ()))):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in msg for k in (
        "connection closed by peer", "connection reset by peer", "broken pipe", "socket timeout", "timed out",
        "communicator was aborted", "processgroupnccl", "processgroupgloo"))


class LostPeerError(RuntimeError):
    """A collective failed: another process of the run died or stopped answering within the timeout."""


class Dist:
    """rank / world of this process and the few collectives the trainer needs."""

    def __init__(self):
        up = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if up else 0
        self.world = dist.get_world_size() if up else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def _on_backend(self, fn, t: torch.Tensor, *args) -> torch.Tensor:
        """fn(t, *args) in place; a CPU tensor under nccl travels through the GPU."""
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            g = t.to(torch.device("cuda", torch.cuda.current_device()))
            self._call(fn, g, *args)
            return t.copy_(g)
        self._call(fn, t, *args)
        return t

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo/nccl: "Connection closed by peer", timeouts, aborted communicators
            if not is_comm_failure(e):
                raise
            raise LostPeerError(f"process {self.rank} of {self.world} lost contact with the others "
                                f"({comm_error_text(e)})") from e

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns t."""
        return self._on_backend(dist.all_reduce, t) if self.active else t

    def mean_(self, tensors: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Average `tensors` over the processes in place, in flat buckets (one all-reduce per ~BUCKET_BYTES);
        `extra` (a small tensor, e.g. the loss) rides in the last bucket and is returned averaged."""
        if not self.active:
            return extra
        items = [*tensors, *([extra] if extra is not None else [])]
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for t in items:
            by_key.setdefault((t.device, t.dtype), []).append(t)
        for group in by_key.values():
            bucket, size = [], 0
            for t in group:
                bucket.append(t)
                size += t.numel() * t.element_size()
                if size >= BUCKET_BYTES:
                    self._mean_bucket(bucket)
                    bucket, size = [], 0
            if bucket:
                self._mean_bucket(bucket)
        return extra

    def _mean_bucket(self, bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        self._on_backend(dist.all_reduce, flat)
        flat.div_(self.world)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset: offset + n].view_as(t))
            offset += n

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._on_backend(dist.broadcast, t, src) if self.active else t

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        self._call(dist.broadcast_object_list, box, src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            self._call(dist.barrier)

    def owner(self, i: int) -> int:
        """The process that handles item i of a list dealt round-robin."""
        return i % self.world

    def mine(self, n: int) -> range:
        """Items of a list of n dealt round-robin that this process handles."""
        return range(self.rank, n, self.world)


SINGLE = Dist.__new__(Dist)
SINGLE.rank, SINGLE.world = 0, 1
