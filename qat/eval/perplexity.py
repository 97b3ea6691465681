"""Perplexity by the protocol of docs/EVAL.md: the token stream (bos prepended once) is cut into non-overlapping windows
of seq_len tokens, and PPL = exp(mean next-token NLL over every predicted position of every window)."""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from qat.data.text import pack_windows, tokenize_file


class NextTokenPerplexity(Perplexity):
    """torchmetrics Perplexity with float64 state and a log-softmax update. The stock update takes log(softmax(x))
    in the logits' dtype, which turns a probability below ~1e-38 into log(0) = inf (a badly quantized model can
    produce those) and keeps float32 rounding in each batch sum; here each position's NLL comes from cross_entropy
    in float32 and the sums are float64. Same states and compute(), so it syncs across processes as the stock one."""

    def __init__(self, ignore_index: int | None = None, **kwargs):
        super().__init__(ignore_index=ignore_index, **kwargs)
        self.set_dtype(torch.float64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.dim() != 3 or target.shape != preds.shape[:2]:
            raise ValueError(f"expected logits [batch, len, vocab] and targets [batch, len], got "
                             f"{tuple(preds.shape)} and {tuple(target.shape)}")
        ignore = -100 if self.ignore_index is None else self.ignore_index
        for logits, tgt in zip(preds, target):  # one row at a time: the float32 copy of [len, vocab] stays small
            nll = F.cross_entropy(logits.float(), tgt, ignore_index=ignore, reduction="none")
            valid = tgt != ignore
            self.total_log_probs += nll[valid].sum(dtype=torch.float64)
            self.count += valid.sum()


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = True, device: str | torch.device | None = None,
               dist=None, lockstep: bool = False) -> dict:
    """PPL of a causal LM (any HF model returning `.logits`, FP or with QuantLinears) on a 1-D token stream (packed
    here into non-overlapping windows) or on ready [n, seq_len] windows.
    Returns {"perplexity", "nll" (mean nats/token), "tokens" (tokens fed), "predicted" (positions scored),
    "windows", "seq_len"}.

    On several processes (`dist`, qat/dist.py: qat distill) the batches are dealt round-robin and the float64 sums
    added up, so every process returns the one-process figure; `lockstep` (FSDP, where every process must run every
    forward) runs the left-over turns on a batch whose result is dropped."""
    from qat.dist import SINGLE

    dist = dist or SINGLE
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if ids.dim() == 2:
        if ids.shape[1] != seq_len:
            raise ValueError(f"windows have length {ids.shape[1]}, seq_len is {seq_len}")
        windows = ids if max_tokens is None else ids[: max_tokens // seq_len]
        if len(windows) == 0:
            raise ValueError(f"max_tokens {max_tokens} is less than one window of seq_len {seq_len}")
    else:
        windows = pack_windows(ids, seq_len, max_tokens)
    if device is not None and torch.device(device) != _model_device(model):
        model.to(device)
    device = _model_device(model)
    metric = NextTokenPerplexity().to(device)
    was_training = model.training
    model.eval()
    n_batches = -(-len(windows) // batch_size)
    mine = list(dist.mine(n_batches))
    turns = -(-n_batches // dist.world) if lockstep else len(mine)
    try:
        with torch.no_grad(), tqdm(total=len(windows), desc="perplexity", unit="win", file=sys.stderr,
                                   disable=not progress or dist.rank > 0, leave=False) as bar:
            for t in range(turns):
                b = mine[t] if t < len(mine) else None
                x = windows[(b if b is not None else 0) * batch_size:][:batch_size].to(device)
                logits = model(input_ids=x, use_cache=False).logits
                if b is not None:
                    metric.update(logits[:, :-1], x[:, 1:])
                bar.update(len(x))
    finally:
        model.train(was_training)
    sums = dist.sum_(torch.stack([metric.total_log_probs, metric.count.to(torch.float64)]).cpu())
    nll = (sums[0] / sums[1]).item()
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": windows.numel(), "predicted": int(sums[1].item()),
            "windows": len(windows), "seq_len": seq_len}


def evaluate_file(model: torch.nn.Module, tokenizer, path: str | os.PathLike, seq_len: int,
                  max_tokens: int | None = None, batch_size: int = 4, progress: bool = True,
                  device: str | torch.device | None = None, add_bos: bool = True, text_field: str = "text") -> dict:
    """perplexity() of `model` on a text/jsonl file tokenized once with bos prepended once (the eval protocol)."""
    ids = tokenize_file(path, tokenizer, add_bos=add_bos, field=text_field)
    return perplexity(model, ids, seq_len, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                      device=device)
