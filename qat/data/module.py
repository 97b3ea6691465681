"""TextDataModule: local text/jsonl files (or pre-tokenized sequences) -> packed windows for distillation.

Batches are plain int64 tensors [batch, seq_len] of input ids. The train order is a permutation drawn from
torch.Generator(seed + epoch), and the position inside the epoch is part of the checkpoint (both through the
DataModule's state_dict and through the train loader, which Lightning treats as a resumable loader), so a run killed
mid-epoch continues with exactly the batches it had not seen yet.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qat.data.text import load_sequences, pack_windows, sample_windows, tokenize_file

SEQUENCE_SUFFIXES = (".pt", ".pth")


class WindowDataset(Dataset):
    """Rows of a [n, seq_len] tensor."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[i]


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """A permutation per epoch from torch.Generator(seed + epoch) (identity order when shuffle=False); under
    torch.distributed each rank takes an equal strided share. `skip` leading indices are left out of the next
    iteration only (resuming mid-epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            idx = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            idx = torch.arange(self.num_samples)
        rank, world = _dist_rank_world()
        per_rank = self.num_samples // world
        return idx[rank: per_rank * world: world].tolist()

    def __len__(self) -> int:
        return self.num_samples // _dist_rank_world()[1]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.order(self.epoch)[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochSampler that counts the batches it has handed out in the current epoch.
    Lightning's fetcher does not prefetch from a sized loader, so that count is the number of batches trained on;
    state_dict/load_state_dict make Lightning save and restore it with the fit loop."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0,
                 drop_last: bool = False, pin_memory: bool = False):
        sampler = EpochSampler(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                         drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False)
        self.epoch_sampler = sampler
        self.batches_consumed = 0  # in epoch `self.position_epoch`
        self.position_epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._batches()

    def _batches(self) -> Iterator[torch.Tensor]:
        # a generator: the epoch is read at the first next(), after Lightning's set_epoch
        epoch = self.epoch_sampler.epoch
        done = 0
        if self._resume is not None and self._resume[0] == epoch:
            done = self._resume[1]
            self.epoch_sampler.skip = done * self.batch_size
        self._resume = None
        self.position_epoch, self.batches_consumed = epoch, done
        for batch in super().__iter__():
            self.batches_consumed += 1
            yield batch
        if self.epoch_sampler.epoch == epoch:  # a plain loop (no Lightning) still reshuffles each epoch
            self.epoch_sampler.set_epoch(epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.epoch_sampler.seed, "epoch": self.position_epoch,
                "batches_consumed": self.batches_consumed, "batch_size": self.batch_size,
                "num_samples": self.epoch_sampler.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("num_samples", self.epoch_sampler.num_samples), ("batch_size", self.batch_size),
                          ("seed", self.epoch_sampler.seed)):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data position: checkpoint has {key}={state[key]}, the data "
                                 f"now has {key}={mine} (train files, seq_len, batch size or seed changed)")
        self._resume = (int(state["epoch"]), int(state["batches_consumed"]))
        self.position_epoch, self.batches_consumed = self._resume
        self.epoch_sampler.set_epoch(int(state["epoch"]))


def _as_paths(files: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [Path(files)]
    return [Path(f) for f in files]


class TextDataModule(L.LightningDataModule):
    """Train windows from local files; validation windows from `val_file`, or a seeded `val_fraction` of the train
    windows. Train sources: text files of any extension, `.jsonl`/`.json` (field `text_field`), or `.pt` lists of
    pre-tokenized sequences (see qat.data.text.save_sequences), concatenated in the order given and packed.
    `tokenizer` is a tokenizer, a model directory, or None when every source is a `.pt` file."""

    def __init__(self, tokenizer, train_files, val_file=None, seq_len: int = 2048, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, val_fraction: float = 0.0, max_train_tokens: int | None = None,
                 max_val_tokens: int | None = None, text_field: str = "text", add_bos: bool = True,
                 drop_last: bool = False, cache_dir: str | os.PathLike | None = None):
        super().__init__()
        if isinstance(tokenizer, (str, os.PathLike)):
            from qat.models.loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.train_files = _as_paths(train_files)
        if not self.train_files:
            raise ValueError("TextDataModule needs at least one train file")
        self.val_file = Path(val_file) if val_file is not None else None
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if self.val_file is not None and val_fraction > 0:
            raise ValueError("give either val_file or val_fraction, not both")
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.val_fraction, self.max_train_tokens, self.max_val_tokens = val_fraction, max_train_tokens, max_val_tokens
        self.text_field, self.add_bos, self.drop_last, self.cache_dir = text_field, add_bos, drop_last, cache_dir
        self.train_ids: torch.Tensor | None = None
        self.train_windows: torch.Tensor | None = None
        self.val_windows: torch.Tensor | None = None
        self._train_loader: ResumableLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    # ---- data ----
    def _source_ids(self, path: Path) -> torch.Tensor:
        if path.suffix.lower() in SEQUENCE_SUFFIXES:
            return torch.cat(load_sequences(path))
        if self.tokenizer is None:
            raise ValueError(f"data file {str(path)!r} is text and needs a tokenizer (only .pt token sequences do not)")
        return tokenize_file(path, self.tokenizer, add_bos=self.add_bos, field=self.text_field,
                             cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_windows is not None:
            return
        ids = torch.cat([self._source_ids(p) for p in self.train_files])
        if self.max_train_tokens is not None:
            ids = ids[: self.max_train_tokens]
        self.train_ids = ids
        windows = pack_windows(ids, self.seq_len)
        if self.val_file is not None:
            val_ids = self._source_ids(self.val_file)
            self.val_windows = pack_windows(val_ids, self.seq_len, self.max_val_tokens)
        elif self.val_fraction > 0:
            n_val = max(1, round(self.val_fraction * len(windows)))
            if n_val >= len(windows):
                raise ValueError(f"val_fraction {self.val_fraction} leaves no train windows out of {len(windows)}")
            perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(self.seed))
            self.val_windows = windows[perm[:n_val].sort().values]
            windows = windows[perm[n_val:].sort().values]
        self.train_windows = windows

    def calibration(self, n: int, seq_len: int | None = None) -> torch.Tensor:
        """[n, seq_len] windows at seeded random offsets of the train token stream (PTQ calibration)."""
        self.setup()
        return sample_windows(self.train_ids, n, seq_len or self.seq_len, self.seed)

    # ---- loaders ----
    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        loader = ResumableLoader(WindowDataset(self.train_windows), self.batch_size, self.seed, shuffle=True,
                                 num_workers=self.num_workers, drop_last=self.drop_last,
                                 pin_memory=torch.cuda.is_available())
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_windows is None:
            return []
        return DataLoader(WindowDataset(self.val_windows), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)

    # ---- checkpointed data position (Lightning saves/restores these with the trainer checkpoint) ----
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._pending_state) if self._pending_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:  # applied when train_dataloader() builds the loader
            self._pending_state = dict(state_dict)
