"""The data path of `qat distill`: a LightningDataModule whose train loader yields, for every optimizer step of the
whole run, the rows of the training pool that this process trains on.

The run is a fixed schedule of steps (StepPlan): stage s draws batches of B_s rows from the first n_s rows of the pool,
in `windows` x `steps_per_window` steps (block-wise stages train one window of blocks after the other; other stages
have one window). The order is defined by global position, never by rank:

    lanes   a stage's rows are dealt once, by a seeded permutation, into B lanes of L = n // B rows each (the n mod B
            rows left over are not used by that stage)
    step t  of window w takes one row from every lane: lane k gives its row perm[w, t // L][k, t % L], with B seeded
            permutations of L per window and epoch (t // L), so each epoch sees every lane row once and batches mix anew
    ranks   process r of W takes lanes [r B / W, (r + 1) B / W): its rows stay the same for the whole stage (block-wise
            stages cache activations of those rows only), the W shards are disjoint and together cover the lanes

The global batch of a step is therefore the same for every W that divides B: a run resumes on another number of
processes, and a W-process run is a one-process run up to the order of fp32 reductions.

The loader is resumable the way Lightning expects (state_dict / load_state_dict, saved with the fit loop): a run
killed after step g continues with step g + 1. Lightning's fetcher does not prefetch from a sized loader, so the
count of batches handed out is the count of steps trained.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler


def _seed(*keys: int) -> int:
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2**62)
    return s


@dataclass(frozen=True)
class StagePlan:
    """Batches of one stage (see the module docstring)."""

    index: int
    n_rows: int  # rows of the pool the stage draws from (its first n_rows)
    batch: int  # global batch B
    windows: int
    steps_per_window: int
    seed: int

    @property
    def total(self) -> int:
        return self.windows * self.steps_per_window

    @property
    def lane_len(self) -> int:
        return self.n_rows // self.batch

    def lanes(self) -> torch.Tensor:
        """[B, L] pool rows of each lane."""
        perm = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(_seed(self.seed, 1)))
        return perm[: self.batch * self.lane_len].view(self.batch, self.lane_len)

    def check_world(self, world: int, name: str) -> None:
        if self.batch % world:
            raise ValueError(f"stage {self.index} ({name}): its batch of {self.batch} rows cannot be split evenly over "
                             f"{world} processes (batch_size must be a multiple of the number of processes)")

    def my_lanes(self, rank: int, world: int) -> slice:
        per = self.batch // world
        return slice(rank * per, (rank + 1) * per)

    def rows_of(self, rank: int, world: int) -> torch.Tensor:
        """The pool rows process `rank` of `world` ever trains on in this stage, ascending."""
        return self.lanes()[self.my_lanes(rank, world)].flatten().sort().values

    def permutations(self, window: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, 2, window, epoch))
        return torch.rand(self.batch, self.lane_len, generator=g).argsort(dim=1)


class StepPlan:
    """The run's steps in order: global step g (0-based) -> (stage, window, step in window)."""

    def __init__(self, stages: list[StagePlan]):
        self.stages = stages
        self.starts, total = [], 0
        for s in stages:
            self.starts.append(total)
            total += s.total
        self.total = total

    def locate(self, g: int) -> tuple[int, int, int]:
        for i in reversed(range(len(self.stages))):
            if g >= self.starts[i]:
                w, t = divmod(g - self.starts[i], self.stages[i].steps_per_window)
                return i, w, t
        raise IndexError(g)

    def fingerprint(self) -> list[dict]:
        return [asdict(s) for s in self.stages]


class StepSampler(Sampler[list[int]]):
    """Batch sampler: for global steps start..total-1, the pool rows process `rank` of `world` trains on."""

    def __init__(self, plan: StepPlan, rank: int = 0, world: int = 1):
        self.plan, self.rank, self.world = plan, rank, world
        self.start = 0  # first step of the next iteration (resume)
        self.position = 0  # steps handed out so far
        self._lanes: dict[int, torch.Tensor] = {}
        self._perm_key, self._perm = None, None

    def __len__(self) -> int:
        return self.plan.total

    def rows_at(self, g: int) -> list[int]:
        s, w, t = self.plan.locate(g)
        sp = self.plan.stages[s]
        if s not in self._lanes:
            self._lanes = {s: sp.lanes()[sp.my_lanes(self.rank, self.world)]}
        epoch, pos = divmod(t, sp.lane_len)
        if self._perm_key != (s, w, epoch):
            self._perm_key, self._perm = (s, w, epoch), sp.permutations(w, epoch)[sp.my_lanes(self.rank, self.world)]
        lanes = self._lanes[s]
        return lanes.gather(1, self._perm[:, pos: pos + 1]).squeeze(1).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        for g in range(start, self.plan.total):
            self.position = g + 1
            yield self.rows_at(g)


class StepLoader(DataLoader):
    """Yields a LongTensor of pool rows per step; resumable (Lightning saves its state with the fit loop)."""

    def __init__(self, plan: StepPlan, rank: int = 0, world: int = 1):
        n = max((s.n_rows for s in plan.stages), default=0)
        super().__init__(range(n), batch_sampler=StepSampler(plan, rank, world))
        self.plan = plan

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.batch_sampler.position, "plan": self.plan.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["plan"] != self.plan.fingerprint():
            raise ValueError("cannot resume the data position: the checkpoint was written for another step schedule "
                             "(stages, steps, batch sizes, data size or seed changed)")
        self.batch_sampler.start = self.batch_sampler.position = int(state["position"])


class StepDataModule(L.LightningDataModule):
    """The pool of training windows (built on every process in setup(), after the processes have met, by
    `make_pool(dist)`) and the per-process step loader over it."""

    def __init__(self, plan: StepPlan, make_pool: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.plan, self.make_pool = plan, make_pool
        self.pool: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pool is None:
            from qat.dist import Dist

            self.pool = self.make_pool(Dist())

    def train_dataloader(self) -> StepLoader:
        t = self.trainer
        return StepLoader(self.plan, t.global_rank if t else 0, t.world_size if t else 1)
