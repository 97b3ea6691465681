"""Output directories that are either complete or absent: everything is written into a temporary sibling directory
and renamed into place at the end, so a crash or a bad input never leaves a half-written checkpoint or replaces a
good one."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists and overwriting was not asked for."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(p)!r} already exists; pass --overwrite to replace it")
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"output path {str(p)!r} exists and is not a directory")
    return p


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces `path` in one rename, on error it is deleted."""
    final = check_output_dir(path, overwrite).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
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
