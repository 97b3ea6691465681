"""Output directories: claimed before any work, written complete or not at all, replaced only when that is safe.

    claim_output(path, kind, overwrite=..., inputs=...)   checks the path and takes an exclusive lock on it, before any
                                                          expensive work; held until the command ends
    atomic_output_dir(path, overwrite, kind=...)          a temporary sibling directory, renamed into place at the end
                                                          (files and directory fsync'd first); it uses the claim this
                                                          thread holds on `path`, or claims it for the duration

Rules (docs/RELIABILITY.md):
  - every qat output directory carries a marker file (MARKER) naming its kind; an existing directory is replaced only
    with --overwrite AND only if it is a qat output of the same kind holding nothing but what that kind writes (or it is
    empty). A directory written by an older qat without a marker counts as its kind when it holds only files that
    kind writes (legacy_kind).
  - an output is never an input of the same command, never contains one and never lies inside one (resolved paths).
  - an output path under an existing file fails at once, not after the work.
  - concurrent writers: the lock is an flock on `.<name>.qat-lock` beside the output; the second writer fails with one
    line naming the holder's pid. The kernel drops the lock when a process dies, so a kill never leaves it stuck, and
    the next claim puts back an output a killed writer had moved aside but not yet replaced.
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = ".qat-output.json"
OUTPUT_KINDS = {
    "student": "a student checkpoint (qat ptq / qat distill)",
    "export": "an export (qat export)",
    "converted-model": "a converted model (qat convert-gguf)",
    "distill-run": "a distillation run directory (qat distill)",
    "adapter": "a LoRA adapter (qat finetune)",
    "finetune-run": "a fine-tuning run directory (qat finetune)",
}
RUN_KINDS = ("distill-run", "finetune-run")  # reused in place, never replaced: their commands check what they hold
# what each kind writes, for directories written before markers existed (and to name foreign files in errors)
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "spiece.model",
                    "sentencepiece*.model")
KIND_FILES = {
    "student": ("config.json", "generation_config.json", *_TOKENIZER_FILES, "qat_student.json", "student.safetensors",
                "distill_summary.png", "distill_history.json"),
    "export": ("config.json", "generation_config.json", *_TOKENIZER_FILES, "model.safetensors"),
    "converted-model": ("config.json", "generation_config.json", *_TOKENIZER_FILES, "model.safetensors"),
    "adapter": ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "qat_adapter.json",
                "finetune_summary.png", "README.md"),
}


class OutputBusyError(FileExistsError):
    """Another process is writing the same output."""


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a qat output directory, or None (no marker, or one that cannot be read)."""
    try:
        d = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("kind") in OUTPUT_KINDS else None


def write_marker(directory: str | os.PathLike, kind: str, info: dict[str, Any] | None = None) -> None:
    (Path(directory) / MARKER).write_text(json.dumps({"kind": kind, **(info or {})}, indent=2, sort_keys=True) + "\n")


def legacy_kind(path: Path) -> str | None:
    """The kind of a directory written by qat before markers existed, judged by what it holds (None if unsure)."""
    names = [p.name for p in path.iterdir()]
    for kind, signature in (("student", "qat_student.json"), ("export", "model.safetensors")):
        if signature in names and all(any(fnmatch.fnmatch(n, pat) for pat in KIND_FILES[kind]) for n in names):
            if kind == "export":
                try:
                    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
                except (OSError, ValueError):
                    return None
                if qc.get("quant_method") != "qat-distill":
                    return None
            return kind
    if (path / "recipe.json").is_file() and (path / "checkpoints").is_dir():
        return "distill-run"
    if (path / "finetune.json").is_file() and (path / "checkpoints").is_dir():
        return "finetune-run"
    return None


def dir_kind(path: Path) -> str | None:
    marker = read_marker(path)
    return marker["kind"] if marker else legacy_kind(path)


def resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_output_path(path: str | os.PathLike, *, what: str = "--output",
                      inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """The resolved output path, after the checks that need no lock: not under a file, not an existing file, not one
    of the command's inputs (nor containing one, nor inside one). `inputs` maps a flag name to its path."""
    final = resolved(path)
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {str(path)!r} is under {str(parent)!r}, which is a file")
            break
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{what} {str(path)!r} exists and is a file, not a directory")
    for flag, src in (inputs or {}).items():
        if not src:
            continue
        s = resolved(src)
        if s == final:
            raise ValueError(f"{what} {str(path)!r} is the input {flag}; write the output somewhere else")
        if s.is_relative_to(final):
            raise ValueError(f"{what} {str(path)!r} contains the input {flag} {str(src)!r}; replacing it would delete "
                             "the input")
        if final.is_relative_to(s):
            raise ValueError(f"{what} {str(path)!r} lies inside the input {flag} {str(src)!r}")
    return final


class _Lock:
    """An exclusive flock on `.<name>.qat-lock` beside `target`; the file is removed on release."""

    def __init__(self, target: Path, what: str):
        self.path = target.parent / f".{target.name}.qat-lock"
        self.target, self.what = target, what
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputBusyError(f"{self.what} {str(self.target)!r} is being written by another qat process "
                                      f"(pid {holder}); wait for it to finish or choose another {self.what}") from None
            try:  # the holder we waited on may have removed the file: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


_held = threading.local()  # path -> OutputClaim held by this thread (a command claims, its writer finds the claim)


def _claims() -> dict[Path, OutputClaim]:
    if not hasattr(_held, "claims"):
        _held.claims = {}
    return _held.claims


class OutputClaim:
    """An output directory this process may write: checked, locked, and what it held when claimed."""

    def __init__(self, path: str | os.PathLike, kind: str, *, overwrite: bool, what: str = "--output",
                 inputs: dict[str, str | os.PathLike | None] | None = None):
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        self.given, self.kind, self.overwrite, self.what = str(path), kind, overwrite, what
        self.path = check_output_path(path, what=what, inputs=inputs)
        self.lock = _Lock(self.path, what)
        self.existed = False

    def __enter__(self) -> OutputClaim:
        self.lock.acquire()
        try:
            self._recover_from_a_killed_writer()
            self.existed = self._check_existing()
        except BaseException:
            self.lock.release()
            raise
        _claims()[self.path] = self
        return self

    def __exit__(self, *exc) -> None:
        _claims().pop(self.path, None)
        self.lock.release()

    def _check_existing(self) -> bool:
        p = self.path
        if not p.exists():
            return False
        if not p.is_dir():
            raise FileExistsError(f"{self.what} {self.given!r} exists and is a file, not a directory")
        if self.kind in RUN_KINDS:  # reused in place, never replaced: qat/distill/run.py, qat/finetune/run.py check
            return True
        entries = sorted(x.name for x in p.iterdir())
        if not entries:
            if not self.overwrite:
                raise FileExistsError(f"{self.what} {self.given!r} already exists; pass --overwrite to replace it")
            return True
        kind = dir_kind(p)
        if kind is None:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise FileExistsError(f"{self.what} {self.given!r} already exists and is not a qat output (no {MARKER}; "
                                  f"it holds {shown}); not replacing it: choose another {self.what} or remove it "
                                  "yourself")
        if kind != self.kind:
            raise FileExistsError(f"{self.what} {self.given!r} holds {OUTPUT_KINDS[kind]}, not "
                                  f"{OUTPUT_KINDS[self.kind]}; not replacing it")
        foreign = [n for n in entries if n != MARKER and not any(fnmatch.fnmatch(n, pat) for pat in KIND_FILES[kind])]
        if foreign:
            raise FileExistsError(f"{self.what} {self.given!r} is {OUTPUT_KINDS[kind]} but also holds "
                                  f"{', '.join(foreign[:3])}, which qat did not write; not replacing it")
        if not self.overwrite:
            raise FileExistsError(f"{self.what} {self.given!r} already exists; pass --overwrite to replace it")
        return True

    def _recover_from_a_killed_writer(self) -> None:
        """What a qat process killed while writing this output left (only qat uses these names, and we hold the lock):
        a previous output moved aside but not yet replaced goes back in place; temporaries are removed."""
        olds = sorted(self.path.parent.glob(f".{self.path.name}.old-*"))
        if olds and not self.path.exists():
            olds.pop().rename(self.path)
        for q in [*olds, *self.path.parent.glob(f".{self.path.name}.tmp-*")]:
            shutil.rmtree(q, ignore_errors=True)


def claim_output(path: str | os.PathLike, kind: str, *, overwrite: bool, what: str = "--output",
                 inputs: dict[str, str | os.PathLike | None] | None = None) -> OutputClaim:
    """Check `path` as an output of `kind` and lock it: `with claim_output(...):` around a command's work."""
    return OutputClaim(path, kind, overwrite=overwrite, what=what, inputs=inputs)


def file_fingerprint(path: Path, full_limit: int = 2 << 30) -> str:
    """sha256 of a file's bytes; above `full_limit` bytes, of its size and 64 evenly spaced 1 MiB blocks (a model of
    hundreds of GB would otherwise take minutes to hash; swapping or editing weights still changes sampled bytes)."""
    import hashlib

    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        for i in range(64):
            f.seek((size - (1 << 20)) * i // 63)
            h.update(f.read(1 << 20))
    return "sampled:" + h.hexdigest()


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so a rename after this never publishes empty files."""
    for d, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, *, kind: str = "student",
                      marker_info: dict[str, Any] | None = None):
    """Yield a temporary directory; on success it gets the kind's marker and replaces `path` in one rename, on error it
    is deleted. Uses the claim this thread holds on `path` (claim_output), or claims it for the duration."""
    held = _claims().get(resolved(path))
    if held is None:
        with claim_output(path, kind, overwrite=overwrite):
            with atomic_output_dir(path, overwrite, kind=kind, marker_info=marker_info) as tmp:
                yield tmp
        return
    if held.kind != kind:
        raise ValueError(f"{str(path)!r} is claimed as {held.kind}, not {kind}")
    final = held.path
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        write_marker(tmp, kind, marker_info)
        fsync_tree(tmp)
        if final.exists() != held.existed:  # only a non-qat writer could do this while we hold the lock
            raise FileExistsError(f"{held.what} {held.given!r} appeared or vanished while this command ran; not "
                                  "replacing it")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)


def clear_entries(directory: Path, names) -> None:
    """--overwrite of a run directory: remove the entries `names` a command wrote there and its marker, nothing else."""
    for name in (*names, MARKER):
        p = Path(directory) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
