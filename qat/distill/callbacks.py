"""Lightning callbacks of a distillation run, the checkpoint files, and the PNG summary.

    CheckpointFiles     <run_dir>/checkpoints/{last,prev}.ckpt: the writer and the resume lookup. A checkpoint is written
                        to a temporary name, fsync'd, and renamed over last.ckpt (the directory fsync'd after), with the
                        previous last.ckpt kept as prev.ckpt, so the last two good checkpoints are always on disk and a
                        kill at any moment leaves a complete last.ckpt (or, before the first rename, none). On resume a
                        truncated or corrupt last.ckpt (zip central directory or member CRCs, qat.models.loading.
                        zip_problem) is reported in one line and prev.ckpt is used.
    DistillCheckpoint   when to write: at the start, every `every` steps, at every window and stage boundary; a NaN stop
                        (raised before the update, see stage.Stage.optimize) keeps the last good one
    StageProgressBar    one tqdm bar per stage (block-wise: per window), with stage/block/step/loss in its label
    write_summary_png   loss curves per stage + validation perplexity per stage
The NaN guard itself lives in stage.Stage.optimize: it must run between backward and the optimizer step.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ProgressBar

LAST, PREV = "last.ckpt", "prev.ckpt"


class CheckpointFiles:
    """The two newest checkpoints of a run directory: atomic, durable writes and the resume lookup.

    Kept small and free of training state so that a multi-process run can call write() on its writing rank alone
    (trainer.save_checkpoint is collective; only the file operations here are per-process)."""

    def __init__(self, dirpath: str | os.PathLike):
        self.dirpath = Path(dirpath)
        self.last, self.prev = self.dirpath / LAST, self.dirpath / PREV
        self.last_is_bad = False  # set when a resume found last.ckpt unusable: it must not become prev.ckpt

    def tmp_path(self) -> Path:
        return self.dirpath / f".{LAST}.{os.getpid()}.tmp"

    def remove_stale_temporaries(self) -> None:
        """What a writer killed mid-commit left (only this class writes `.*.tmp` here)."""
        for q in self.dirpath.glob(".*.tmp"):
            q.unlink(missing_ok=True)

    def commit(self, tmp: Path, info: dict) -> None:
        """fsync `tmp`, keep the current last.ckpt as prev.ckpt, rename `tmp` to last.ckpt, fsync the directory.
        At every instant last.ckpt is a complete file (old or new) once the first one exists."""
        from qat.io import fsync_dir

        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.last.exists() and not self.last_is_bad:
            link = self.dirpath / f".{PREV}.{os.getpid()}.tmp"
            link.unlink(missing_ok=True)
            try:
                os.link(self.last, link)  # prev := the current last (same inode), then swap it in atomically
                os.replace(link, self.prev)
            except OSError:  # a filesystem without hard links: a kill before the next rename leaves prev.ckpt only,
                os.replace(self.last, self.prev)  # which the resume lookup falls back to
        os.replace(tmp, self.last)
        self.last_is_bad = False
        info_tmp = self.dirpath / ".last.json.tmp"
        info_tmp.write_text(json.dumps(info, indent=2))
        os.replace(info_tmp, self.dirpath / "last.json")
        fsync_dir(self.dirpath)

    def write(self, trainer, info: dict) -> Path:
        """Every process takes part in save_checkpoint (the strategy may gather state); rank 0 alone writes files."""
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_path()
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            self.commit(tmp, info)
        return self.last

    def find_resumable(self) -> tuple[Path, str | None]:
        """(checkpoint to resume from, a one-line warning when last.ckpt was unusable and prev.ckpt is used)."""
        from qat.models.loading import zip_problem

        if not self.last.exists() and not self.prev.exists():
            raise FileNotFoundError(f"no checkpoint to resume at {str(self.last)!r} (the run directory has none yet: "
                                    "start without --resume)")
        problems = []
        for p in (self.last, self.prev):
            why = zip_problem(p) if p.exists() else "missing"
            if why is None:
                if p == self.prev:
                    self.last_is_bad = True
                    return p, f"{self.last} is unusable ({problems[0]}); resuming from {PREV}"
                return p, None
            problems.append(why)
        raise ValueError(f"no usable checkpoint in {self.dirpath}: {LAST} {problems[0]}, {PREV} {problems[1]}")


class DistillCheckpoint(Callback):
    def __init__(self, files: CheckpointFiles, every: int):
        self.files = files
        self.every = every
        self.last_path: Path | None = None
        files.remove_stale_temporaries()

    @property
    def path(self) -> Path:
        return self.files.last

    def save(self, trainer, module) -> None:
        info = {"global_step": module.global_step_, "stage_index": module.stage_index, "finished": module.finished,
                **({"where": module.stage.where()} if module.stage is not None and not module.stage.done else {})}
        self.last_path = self.files.write(trainer, info)

    def on_train_start(self, trainer, module) -> None:
        if module.resumed_from is None and module.global_step_ == 0:
            self.save(trainer, module)  # the PTQ student: a resume never has to redo PTQ

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.should_checkpoint(self.every) or module.finished:
            self.save(trainer, module)


class StageProgressBar(ProgressBar):
    """tqdm bars on stderr: 'stage 0 blockwise0 | window 3/30 blocks [2] | loss 0.0123'."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._bar = None
        self._key = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        from tqdm.auto import tqdm

        info = module.progress_info()
        if "name" not in info:
            self._close()
            return
        if "window" in info:
            key = (info["stage_index"], info["window"])
            total, n = info["steps_per_window"], info["step_in_window"]
            desc = (f"stage {info['stage_index']} {info['name']} | window {info['window'] + 1}/{info['n_windows']} "
                    f"blocks {info['blocks']}")
        else:
            key = (info["stage_index"], None)
            total, n = info["total"], info["step"]
            desc = f"stage {info['stage_index']} {info['name']}"
        if key != self._key:
            self._close()
            self._key = key
            self._bar = tqdm(total=total, initial=n - 1 if n else 0, desc=desc, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        self._bar.n = n
        self._bar.set_postfix(loss=f"{info['loss']:.4g}", refresh=False)
        self._bar.refresh()

    def on_distill_stage_end(self, trainer, module) -> None:
        self._close()
        if not trainer.is_global_zero:
            return
        h = module.history[-1]
        msg = f"stage {h['index']} {h['stage']} done: final loss {h.get('final_loss', float('nan')):.4g}"
        if "val_ppl" in h:
            msg += f", val perplexity {h['val_ppl']:.2f}"
        self.print(msg)

    def print(self, *args, **kwargs) -> None:
        print(*args, file=sys.stderr, **kwargs)

    def on_train_end(self, trainer, module) -> None:
        self._close()


def write_summary_png(history: list[dict], loss_log: list, path: str | os.PathLike, title: str = "") -> Path:
    """Left: training loss per step, one colour per stage (log scale). Right: validation perplexity after PTQ and
    after every stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    stages = sorted({int(s) for _, s, _ in loss_log})
    for s in stages:
        pts = [(g, v) for g, si, v in loss_log if int(si) == s and v is not None and math.isfinite(v) and v > 0]
        if pts:
            name = next((h["stage"] for h in history if h.get("index") == s), f"stage {s}")
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=f"{s}: {name}")
    ax1.set_yscale("log")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    if stages:
        ax1.legend(fontsize=8)
    ppl = [(h["stage"], h["val_ppl"]) for h in history if "val_ppl" in h]
    if ppl:
        ax2.bar(range(len(ppl)), [v for _, v in ppl], color="tab:blue")
        ax2.set_xticks(range(len(ppl)), [n for n, _ in ppl], rotation=20, fontsize=8)
        ax2.set_yscale("log")
        for i, (_, v) in enumerate(ppl):
            ax2.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax2.set_title("validation perplexity")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
