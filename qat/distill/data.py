"""Training windows for a distillation run: from a text corpus, or sampled from the teacher itself (BitDistiller's
self-generated data) and cached on disk, so a rerun or a resume reads the same sequences instead of sampling again."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from qat.dist import SINGLE, Dist
from qat.distill.recipe import DataSpec


def model_fingerprint(model_dir) -> str:
    """Changes when the model directory's config or weight files change (name, size, mtime)."""
    p = Path(model_dir)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def training_pool(spec: DataSpec, teacher, tokenizer, model_dir, seed: int, cache_dir, progress: bool = True,
                  dist: Dist = SINGLE) -> torch.Tensor:
    """[num_samples, seq_len] training windows for `spec.source` (text | teacher | mixed); the same on every process
    of a multi-process run (`dist` shares the teacher sampling)."""
    if spec.source == "text":
        return corpus_windows(spec, tokenizer, spec.num_samples, spec.seq_len, seed)
    if spec.source == "teacher":
        return teacher_windows(spec, teacher, tokenizer, model_dir, seed, cache_dir, progress, dist)
    n_t = min(max(round(spec.num_samples * spec.teacher_fraction), 1), spec.num_samples - 1)
    corpus = corpus_windows(spec, tokenizer, spec.num_samples - n_t, spec.seq_len, seed)
    gen = teacher_windows(dataclasses.replace(spec, num_samples=n_t), teacher, tokenizer, model_dir, seed, cache_dir,
                          progress, dist)
    return interleave(corpus, gen)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a and b merged by their relative position (row i of a sits at (i + 1/2) / len(a)), so every prefix
    holds both in proportion; deterministic, ties go to a."""
    keys = [((i + 0.5) / len(a), 0, i) for i in range(len(a))] + [((j + 0.5) / len(b), 1, j) for j in range(len(b))]
    return torch.stack([(a, b)[src][i] for _, src, i in sorted(keys)])


def corpus_windows(spec: DataSpec, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    from qat.data.text import sample_windows, tokenize_file

    return sample_windows(tokenize_file(spec.train_file, tokenizer), n, seq_len, seed)


@torch.no_grad()
def teacher_windows(spec: DataSpec, teacher, tokenizer, model_dir, seed: int, cache_dir, progress: bool = True,
                    dist: Dist = SINGLE) -> torch.Tensor:
    """[num_samples, seq_len] sequences sampled from the teacher (prompt = the first prompt_len tokens of a corpus
    window, or the bos token alone), cached under cache_dir keyed by everything that changes them.

    Each chunk of gen_batch_size sequences is sampled from its own seed, so the pool does not depend on how many
    processes share the work: on N processes chunk c is sampled by process c mod N and sent to the others; process 0
    alone reads and writes the cache."""
    from qat.data.text import load_sequences, save_sequences

    n, L, P = spec.num_samples, spec.seq_len, spec.prompt_len
    prompt_src = None
    if P > 0:
        if not spec.train_file:
            raise ValueError("data.source teacher with prompt_len > 0 needs data.train_file for the prompts")
        prompt_src = hashlib.sha256(Path(spec.train_file).read_bytes()).hexdigest()
    elif tokenizer.bos_token_id is None:
        raise ValueError("data.source teacher with prompt_len 0 needs a tokenizer with a bos token")
    key = json.dumps({"v": 2, "model": model_fingerprint(model_dir), "n": n, "L": L, "P": P, "T": spec.temperature,
                      "top_p": spec.top_p, "seed": seed, "prompts": prompt_src, "chunk": spec.gen_batch_size},
                     sort_keys=True)
    path = Path(cache_dir) / f"teacher-samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    cached = None
    if dist.rank == 0 and path.is_file():
        try:
            seqs = load_sequences(path)
            if len(seqs) == n and all(s.numel() == L for s in seqs):
                cached = torch.stack(seqs)
        except ValueError:
            pass  # a damaged cache entry is regenerated
    if dist.broadcast_object(cached is not None):
        return dist.broadcast_(cached if cached is not None else torch.empty(n, L, dtype=torch.long))
    if P > 0:
        prompts = corpus_windows(spec, tokenizer, n, P, seed)
    else:
        prompts = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    from transformers import GenerationConfig

    new = L - prompts.shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    gen = GenerationConfig(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    dev = next(teacher.parameters()).device
    from tqdm.auto import tqdm

    b = spec.gen_batch_size
    n_chunks = -(-n // b)
    windows = torch.empty(n, L, dtype=torch.long)
    for c in tqdm(dist.mine(n_chunks), desc="teacher samples", disable=not progress or dist.rank > 0, unit="batch"):
        p = prompts[c * b: (c + 1) * b].to(dev)
        torch.manual_seed(seed * 1_000_003 + c)
        seq = teacher.generate(input_ids=p, attention_mask=torch.ones_like(p), generation_config=gen)
        if seq.shape[1] < L:
            raise ValueError(f"teacher generation returned {seq.shape[1]} tokens, expected {L}")
        windows[c * b: (c + 1) * b] = seq[:, :L].cpu()
    for c in range(n_chunks) if dist.active else ():
        dist.broadcast_(windows[c * b: (c + 1) * b], src=dist.owner(c))
    if dist.rank == 0:
        save_sequences(list(windows), path)
    return windows


def eval_ids(path, tokenizer) -> torch.Tensor:
    from qat.data.text import tokenize_file

    return tokenize_file(path, tokenizer)
