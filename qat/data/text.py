"""Text files -> token ids -> fixed-length windows.

The eval protocol (docs/EVAL.md) tokenizes a whole file once, prepends the bos id once, and cuts the stream
into non-overlapping windows; everything here keeps that exact: plain text is read byte-for-byte apart from newline
normalisation (CRLF -> LF, as Python's text mode does), never line by line.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

JSON_SUFFIXES = (".jsonl", ".json")
TOKEN_CACHE_VERSION = 1


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    if not p.is_file():
        raise FileNotFoundError(f"data path {str(p)!r} is not a file")
    return p


def read_text(path: str | os.PathLike, field: str = "text") -> str:
    """The text of a local file. `.jsonl`/`.json` go through the datasets `json` builder and their `field` values are
    joined with blank lines; any other file is read as UTF-8 with universal newlines (CRLF -> LF)."""
    p = _existing_file(path)
    if p.suffix.lower() in JSON_SUFFIXES:
        text = "\n\n".join(read_json_documents(p, field))
    else:
        try:
            with open(p, encoding="utf-8") as f:  # text mode: "\r\n" and "\r" become "\n", as in eval_ppl.py
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"data file {str(p)!r} is empty")
    return text


def read_json_documents(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The `field` value of every record of a JSON-lines (or JSON) file, in file order."""
    p = _existing_file(path)
    if p.stat().st_size == 0:
        raise ValueError(f"data file {str(p)!r} is empty")
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    except Exception as e:  # malformed JSON surfaces as several datasets/pyarrow error types
        raise ValueError(f"data file {str(p)!r}: cannot read as JSON lines ({type(e).__name__})") from None
    if field not in ds.column_names:
        raise ValueError(f"data file {str(p)!r} has no field {field!r} (fields: {', '.join(ds.column_names)})")
    return [t for t in ds[field] if isinstance(t, str) and t]


def tokenize(text: str, tokenizer, add_bos: bool = True) -> torch.Tensor:
    """1-D int64 ids of `text`, with the tokenizer's bos id prepended once (when it has one and add_bos)."""
    # verbose=False: a whole corpus is longer than model_max_length by design; it is windowed afterwards
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + list(ids)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the full tokenizer.json: vocab, merges, normalizer, pre-tokenizer, added tokens
        h.update(backend.to_str().encode())
    else:
        h.update(f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}".encode())
    h.update(f"|bos={tokenizer.bos_token_id}".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("QAT_CACHE_DIR") or Path.home() / ".cache" / "qat")


def tokenize_file(path: str | os.PathLike, tokenizer, add_bos: bool = True, field: str = "text",
                  cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> torch.Tensor:
    """tokenize(read_text(path)), memoised on disk under `cache_dir/tokens` (default $QAT_CACHE_DIR or
    ~/.cache/qat). The key is the file's content hash and the tokenizer's fingerprint, so an edited file or another
    tokenizer never hits a stale entry."""
    p = _existing_file(path)
    if not use_cache:
        return tokenize(read_text(p, field), tokenizer, add_bos)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    key = hashlib.sha256(f"v{TOKEN_CACHE_VERSION}|{h.hexdigest()}|{tokenizer_fingerprint(tokenizer)}|"
                         f"bos={add_bos}|field={field if p.suffix.lower() in JSON_SUFFIXES else ''}".encode())
    entry = Path(cache_dir or default_cache_dir()) / "tokens" / f"{p.stem[:40]}-{key.hexdigest()[:24]}.pt"
    if entry.is_file():
        try:
            return torch.load(entry, weights_only=True).long()
        except Exception:  # a truncated entry (killed writer on a filesystem without atomic rename): rebuild it
            pass
    ids = tokenize(read_text(p, field), tokenizer, add_bos)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        torch.save(ids.to(torch.int32) if len(tokenizer) < 2**31 else ids, tmp)
        os.replace(tmp, entry)
    except OSError:  # a read-only cache is not an error, only slower
        pass
    return ids


def _check_ids(ids: torch.Tensor, seq_len: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one predicted token), got {seq_len}")


def pack_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows of the first `max_tokens` ids; a trailing partial window is dropped."""
    _check_ids(ids, seq_len)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of seq_len {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len).long()


def sample_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n, seq_len] windows at uniformly random offsets (calibration sets); the same seed gives the same windows."""
    _check_ids(ids, seq_len)
    if n < 1:
        raise ValueError(f"number of windows must be positive, got {n}")
    if ids.numel() < seq_len:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()]).long()


def save_sequences(sequences: Sequence[torch.Tensor | Sequence[int]], path: str | os.PathLike) -> Path:
    """Store pre-tokenized sequences (e.g. text sampled from the teacher, the cache of qat/distill/data.py)."""
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    torch.save(seqs, tmp)
    os.replace(tmp, p)
    return p


def load_sequences(path: str | os.PathLike) -> list[torch.Tensor]:
    """Pre-tokenized sequences saved with torch.save: a list of 1-D id tensors (or int lists), or a 2-D tensor."""
    p = _existing_file(path)
    try:
        obj = torch.load(p, weights_only=True)
    except Exception as e:
        raise ValueError(f"data file {str(p)!r}: cannot load token sequences ({type(e).__name__})") from None
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 2:
            raise ValueError(f"data file {str(p)!r}: expected a 2-D tensor of sequences, got shape {tuple(obj.shape)}")
        obj = list(obj)
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"data file {str(p)!r}: expected a list of token sequences, got {type(obj).__name__}")
    seqs = []
    for i, s in enumerate(obj):
        t = torch.as_tensor(s)
        if t.dim() != 1 or t.is_floating_point() or t.is_complex():
            raise ValueError(f"data file {str(p)!r}: sequence {i} is not a 1-D integer sequence")
        seqs.append(t.long())
    if sum(s.numel() for s in seqs) == 0:
        raise ValueError(f"data file {str(p)!r} is empty")
    return seqs
