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

from qat.speed import LEVERS

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


# ---- logit losses: row chunks with the gradient in the same pass (qat.speed lever fused_loss) ------------------------
_CHUNK_ELEMENTS = 2**17  # ~0.5 MB of float32 per temporary: a chunk's softmax work stays in the CPU's L2 cache


class _ChunkedLogitsLoss(torch.autograd.Function):
    """kl | reverse_kl | cakld | ce of logits [B, L, V], walked in chunks of rows: per chunk the log-softmaxes, the
    loss and d loss / d student logits are computed together and the gradient is written straight into one [B, L, V]
    tensor, so the logits are read once and that gradient written once; the autograd reference materialises several
    [B, L, V] tensors (the temperature copies, both log-softmaxes, the teacher probabilities, their difference) and
    walks them again in the backward pass. Per row, with ls = log_softmax(s / T), lt = log_softmax(t / T), ps, pt
    their probabilities and n rows in the mean:
        kl          sum pt (lt - ls)             d/ds = (ps - pt) T / n                (times T^2, as the reference)
        reverse_kl  r = sum ps (ls - lt)         d/ds = ps (ls - lt - r) T / n
        cakld       gamma kl + (1 - gamma) reverse_kl
        ce          -ls[target] (T = 1, rows 0..L-2 against the next token)   d/ds = (ps - onehot) / n
    """

    @staticmethod
    def forward(ctx, student, teacher, target, kind: str, temperature: float, gamma: float | None):
        B, L, V = student.shape
        used = L - 1 if kind == "ce" else L
        n, T = B * used, temperature
        rows = max(1, _CHUNK_ELEMENTS // V)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        if grad is not None and used < L:
            grad[:, used:].zero_()
        w_f = {"kl": 1.0, "reverse_kl": 0.0, "ce": 1.0}.get(kind, gamma)  # weight of the forward KL
        scale = (1.0 if kind == "ce" else T) / n
        total = 0.0
        for b in range(B):
            for i in range(0, used, rows):
                sl = slice(i, min(i + rows, used))
                s = student[b, sl].float()
                ls = torch.log_softmax(s if T == 1 else s / T, -1)
                out = None if grad is None else grad[b, sl] if grad.dtype == torch.float32 else torch.empty_like(ls)
                if kind == "ce":
                    tgt = target[b, sl].unsqueeze(-1)
                    total -= float(ls.gather(-1, tgt).sum())
                    if out is not None:
                        torch.exp(ls, out=out).scatter_add_(-1, tgt, out.new_full(tgt.shape, -1.0)).mul_(scale)
                else:
                    t = teacher[b, sl].float()
                    lt = torch.log_softmax(t if T == 1 else t / T, -1)
                    ps = None if w_f == 1 and out is None else torch.exp(ls, out=out)  # ps, in the gradient's place
                    d = ls.sub_(lt)  # ls - lt
                    pt = lt.exp_()
                    if w_f > 0:
                        total -= w_f * float(torch.mul(pt, d).sum())  # kl = sum pt (lt - ls)
                    if w_f < 1:
                        r = torch.mul(ps, d).sum(-1, keepdim=True)
                        total += (1 - w_f) * float(r.sum())
                    if out is not None:  # out holds ps; make it w_f (ps - pt) + (1 - w_f) ps (d - r)
                        if w_f < 1:
                            d.sub_(r).mul_(ps).mul_(1 - w_f)
                        if w_f > 0:
                            ps.sub_(pt).mul_(w_f)
                        if w_f < 1:
                            out.add_(d) if w_f > 0 else out.copy_(d)
                        out.mul_(scale)
                if out is not None and out.data_ptr() != grad[b, sl].data_ptr():
                    grad[b, sl] = out
        ctx.save_for_backward(grad)
        loss = total / n * (1.0 if kind == "ce" else T * T)
        return student.new_tensor(loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        return grad * go.to(grad.dtype), None, None, None, None, None


def _fused(kind: str, student_logits, teacher_logits, input_ids, temperature: float = 1.0, gamma=None):
    """The chunked loss when the lever is on and it applies (3-D logits, no gradient wanted for the teacher's)."""
    if not LEVERS.fused_loss or student_logits.dim() != 3:
        return None
    if teacher_logits is not None and (teacher_logits.requires_grad or teacher_logits.shape != student_logits.shape):
        return None
    target = input_ids[:, 1:] if kind == "ce" else None
    return _ChunkedLogitsLoss.apply(student_logits, teacher_logits, target, kind, float(temperature), gamma)


def _kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return ls, lt


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(P_T || P_S), times T^2."""
    fused = _fused("kl", student_logits, teacher_logits, None, temperature)
    if fused is not None:
        return fused
    ls, lt = _kl_terms(student_logits, teacher_logits, temperature)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature**2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(P_S || P_T), times T^2."""
    fused = _fused("reverse_kl", student_logits, teacher_logits, None, temperature)
    if fused is not None:
        return fused
    ls, lt = _kl_terms(student_logits, teacher_logits, temperature)
    return (ls.exp() * (ls - lt)).sum(-1).mean() * temperature**2


def cakld(student_logits, teacher_logits, gamma: float, temperature: float = 1.0) -> torch.Tensor:
    fused = _fused("cakld", student_logits, teacher_logits, None, temperature, float(gamma))
    if fused is not None:
        return fused
    ls, lt = _kl_terms(student_logits, teacher_logits, temperature)
    fkl = (lt.exp() * (lt - ls)).sum(-1).mean()
    rkl = (ls.exp() * (ls - lt)).sum(-1).mean()
    return (gamma * fkl + (1 - gamma) * rkl) * temperature**2


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    fused = _fused("ce", logits, None, input_ids)
    if fused is not None:
        return fused
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
