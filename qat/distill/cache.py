"""Hidden-state caches for block-wise distillation: an [N, L, d] tensor held in memory, or, above a size threshold,
in a file-backed tensor under the run directory (so a large calibration set costs disk, not RAM)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch


class ActivationStore:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, spill_bytes: float,
                 spill_dir: str | os.PathLike | None):
        self.shape, self.dtype = tuple(shape), dtype
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.path: Path | None = None
        if nbytes > spill_bytes and spill_dir is not None:
            d = Path(spill_dir)
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / f"acts-{uuid.uuid4().hex[:12]}.bin"
            self.data = torch.from_file(str(self.path), shared=True, size=torch.Size(shape).numel(),
                                        dtype=dtype).view(shape)
            self.device = torch.device("cpu")
        else:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            self.device = torch.device(device)
        self.nbytes = nbytes

    @classmethod
    def from_tensor(cls, t: torch.Tensor, spill_bytes: float, spill_dir) -> ActivationStore:
        s = cls(t.shape, t.dtype, t.device, spill_bytes, spill_dir)
        s.data.copy_(t)
        return s

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def get(self, idx, device) -> torch.Tensor:
        return self.data[idx].to(device)

    def put(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.to(self.data.device, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        self.data = None
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            self.path = None

    def __del__(self):
        self.close()
