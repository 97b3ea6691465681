"""Training windows for a distillation run: from a text corpus, or sampled from the teacher itself (BitDistiller's
self-generated data) and cached on disk, so a rerun or a resume reads the same sequences instead of sampling again."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from qat.distill.recipe import DataSpec


def model_fingerprint(model_dir) -> str:
    """Changes when the model directory's config or weight files change (name, size, mtime)."""
    p = Path(model_dir)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def training_pool(spec: DataSpec, teacher, tokenizer, model_dir, seed: int, cache_dir, progress: bool = True
                  ) -> torch.Tensor:
    """[num_samples, seq_len] training windows for `spec.source` (text | teacher | mixed)."""
    if spec.source == "text":
        return corpus_windows(spec, tokenizer, spec.num_samples, spec.seq_len, seed)
    if spec.source == "teacher":
        return teacher_windows(spec, teacher, tokenizer, model_dir, seed, cache_dir, progress)
    n_t = min(max(round(spec.num_samples * spec.teacher_fraction), 1), spec.num_samples - 1)
    corpus = corpus_windows(spec, tokenizer, spec.num_samples - n_t, spec.seq_len, seed)
    gen = teacher_windows(dataclasses.replace(spec, num_samples=n_t), teacher, tokenizer, model_dir, seed, cache_dir,
                          progress)
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
def teacher_windows(spec: DataSpec, teacher, tokenizer, model_dir, seed: int, cache_dir, progress: bool = True
                    ) -> torch.Tensor:
    """[num_samples, seq_len] sequences sampled from the teacher (prompt = the first prompt_len tokens of a corpus
    window, or the bos token alone), cached under cache_dir keyed by everything that changes them."""
    from qat.data.text import load_sequences, save_sequences

    n, L, P = spec.num_samples, spec.seq_len, spec.prompt_len
    prompt_src = None
    if P > 0:
        if not spec.train_file:
            raise ValueError("data.source teacher with prompt_len > 0 needs data.train_file for the prompts")
        prompt_src = hashlib.sha256(Path(spec.train_file).read_bytes()).hexdigest()
    elif tokenizer.bos_token_id is None:
        raise ValueError("data.source teacher with prompt_len 0 needs a tokenizer with a bos token")
    key = json.dumps({"v": 1, "model": model_fingerprint(model_dir), "n": n, "L": L, "P": P, "T": spec.temperature,
                      "top_p": spec.top_p, "seed": seed, "prompts": prompt_src}, sort_keys=True)
    path = Path(cache_dir) / f"teacher-samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            seqs = load_sequences(path)
            if len(seqs) == n and all(s.numel() == L for s in seqs):
                return torch.stack(seqs)
        except ValueError:
            pass  # a damaged cache entry is regenerated
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
    torch.manual_seed(seed)
    out = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, n, spec.gen_batch_size), desc="teacher samples", disable=not progress, unit="batch"):
        p = prompts[i: i + spec.gen_batch_size].to(dev)
        seq = teacher.generate(input_ids=p, attention_mask=torch.ones_like(p), generation_config=gen)
        out.append(seq[:, :L].cpu())
    windows = torch.cat(out)
    if windows.shape[1] != L:
        raise ValueError(f"teacher generation returned {windows.shape[1]} tokens, expected {L}")
    save_sequences(list(windows), path)
    return windows


def eval_ids(path, tokenizer) -> torch.Tensor:
    from qat.data.text import tokenize_file

    return tokenize_file(path, tokenizer)
