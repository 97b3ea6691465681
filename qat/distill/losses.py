"""Distillation losses.

Block-wise (hidden states [B, L, d], student vs teacher):
    mse        mean over tokens of mean_d (s - t)^2
    token_mse  mean over tokens of mean_d (s - t)^2 / mean_d t^2: each token's *relative* error. Needed on real LLMs:
               the attention-sink position (position 0) carries hidden states ~150x larger than the median token from
               the middle blocks on (SmolLM2-135M: norm 23,679 vs 151 at block 15), so plain MSE is almost entirely that
               one token and the other 511 positions barely train.
    cosine     mean over tokens of 1 - cos(s_t, t_t)
  every block loss takes `sink_weight` (weight of position 0; 0 leaves it out) and an optional + w * (1 - cos) term.

End-to-end (logits [B, L, V]):
    kl          KL(P_T || P_S) (forward; mode-covering)
    reverse_kl  KL(P_S || P_T) (mode-seeking)
    cakld       gamma * KL(P_T||P_S) + (1 - gamma) * KL(P_S||P_T), gamma = the teacher's mean probability of the data's
                next tokens (BitDistiller's confidence-aware KL)
    ce          next-token cross-entropy on the data
KL terms use a softmax temperature T and are multiplied by T^2 (Hinton) so their gradient scale does not depend on T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _token_weights(length: int, sink_weight: float, device) -> torch.Tensor:
    w = torch.ones(length, device=device)
    w[0] = sink_weight
    return w


def _cos_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)


def per_token_block_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                         cosine_weight: float = 0.0) -> torch.Tensor:
    """[B, L] per-token loss between hidden states [B, L, d] (computed in float32)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)
    elif kind == "token_mse":
        per = (s - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp_min(_EPS)
    elif kind == "cosine":
        per = _cos_term(s, t)
    else:
        raise ValueError(f"unknown block loss {kind!r}; supported: mse, token_mse, cosine")
    if cosine_weight:
        per = per + cosine_weight * _cos_term(s, t)
    return per


def block_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "token_mse", sink_weight: float = 1.0,
               cosine_weight: float = 0.0) -> torch.Tensor:
    """Scalar block reconstruction loss: per-token loss averaged with position 0 weighted by `sink_weight`."""
    if student.shape != teacher.shape:
        raise ValueError(f"block loss: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    per = per_token_block_loss(student, teacher, kind, cosine_weight)
    w = _token_weights(per.shape[-1], sink_weight, per.device)
    if float(w.sum()) == 0:  # a single-token sequence with the sink left out
        return per.sum() * 0
    return (per * w).sum() / (w.sum() * per.shape[0])


def _kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return ls, lt


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(P_T || P_S), times T^2."""
    ls, lt = _kl_terms(student_logits, teacher_logits, temperature)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature**2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(P_S || P_T), times T^2."""
    ls, lt = _kl_terms(student_logits, teacher_logits, temperature)
    return (ls.exp() * (ls - lt)).sum(-1).mean() * temperature**2


def cakld(student_logits, teacher_logits, gamma: float, temperature: float = 1.0) -> torch.Tensor:
    ls, lt = _kl_terms(student_logits, teacher_logits, temperature)
    fkl = (lt.exp() * (lt - ls)).sum(-1).mean()
    rkl = (ls.exp() * (ls - lt)).sum(-1).mean()
    return (gamma * fkl + (1 - gamma) * rkl) * temperature**2


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def logits_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                input_ids: torch.Tensor, *, temperature: float = 1.0, gamma: float | None = None) -> torch.Tensor:
    if kind == "kl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if kind == "cakld":
        if gamma is None:
            raise ValueError("cakld needs the teacher confidence gamma")
        return cakld(student_logits, teacher_logits, gamma, temperature)
    if kind == "ce":
        return next_token_ce(student_logits, input_ids)
    raise ValueError(f"unknown end-to-end loss {kind!r}; supported: kl, reverse_kl, cakld, ce")


@torch.no_grad()
def teacher_confidence(teacher, windows: torch.Tensor, batch_size: int = 4, dist=None, lockstep: bool = False
                       ) -> float:
    """BitDistiller's gamma: mean over the data of the teacher's probability of each actual next token. On several
    processes (`dist`, qat/dist.py) the batches are dealt round-robin and the sums added up (float64); `lockstep`
    (FSDP: every process must run every forward) runs the left-over turns on a batch whose result is dropped."""
    from qat.dist import SINGLE

    dist = dist or SINGLE
    dev = next(teacher.parameters()).device
    n_batches = -(-windows.shape[0] // batch_size)
    turns = -(-n_batches // dist.world) if lockstep else None
    mine = list(dist.mine(n_batches))
    sums = torch.zeros(2, dtype=torch.float64)
    for t in range(turns if lockstep else len(mine)):
        c = mine[t] if t < len(mine) else None
        x = windows[(c if c is not None else 0) * batch_size:][:batch_size].to(dev)
        logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)
        p = logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1).exp()
        if c is not None:
            sums += torch.tensor([float(p.sum()), p.numel()], dtype=torch.float64)
    dist.sum_(sums)
    return float(sums[0] / max(float(sums[1]), 1.0))
