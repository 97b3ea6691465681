"""Learned rounding for the block-wise stage: SignRound (AutoRound's algorithm) on uniform weight quantizers.

A GPTQ or RTN student fixes every weight's integer code once; training scales and zero points afterwards
(freeze_codes) never revisits that choice, and training the latent weight with a small learning rate flips almost no
code at 2 bits (a code changes only after the latent moves half a step). SignRound (Cheng et al., "Optimize Weight
Rounding via Signed Gradient Descent", arXiv 2309.05516) learns the rounding directly. Per quantized linear of the
active window:

    wmin = min(0, min_g w) * min_scale        wmax = max(0, max_g w) * max_scale       (per group g)
    s    = fp16((wmax - wmin) / qmax)         z    = round(-wmin / s)
    q    = clamp(round(w / s + V) + z, 0, qmax)           w_hat = s * (q - z)

with V (one offset per weight, |V| <= `range`, initialised at 0) and the clipping factors min_scale/max_scale
(per group, in [0, 1], initialised at 1) trained by signed gradient descent: p -= lr * sign(grad), the learning rate
decaying linearly to 0 over the window (with lr = 1/steps a parameter can move at most 1/2 over the window, so V
decides exactly the ambiguous roundings; windows shorter than 50 steps keep lr = 1/50, see default_signround_lr).
Symmetric grids keep z = 2^(b-1) and learn one clipping factor of max|w|.
The loss is the stage's block loss; the parameters of the step with the lowest loss are kept (`best`), as AutoRound
does. `w` is the live latent weight: frozen unless the stage also trains `latent`.

The learner owns the grid while its window trains (the quantizer's own scale/zero are not used, so a stage with
rounding may not also train `wq`). When the window ends, bake() writes s into the quantizer's scale, z into its zero
point and s * (q - z) into the latent weight: the quantizer's ordinary forward (and pack()) then reproduce the trained
model bit for bit, and the next window and stage see exactly what will be exported.

`method: adaround` is the alternative the comparison in docs/RESULTS.md measured against it (AdaRound, Nagel et al.,
arXiv 2004.10568): the grid stays the quantizer's (s, z) and every weight rounds down or up by a soft variable,

    q = clamp(floor(w / s) + h(V) + z, 0, qmax),   h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1)

initialised at the weight's fractional position (so training starts at the FP weight), trained with Adam, plus
lambda * mean(1 - |2h - 1|^beta) (beta annealed 20 -> 2 after the first 20% of the steps) pushing h to 0 or 1; the
window ends with the hard rounding h >= 1/2.

Resume: the learner's parameters, optimizer and schedule, and the best copies go into the stage's checkpoint state.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.distill.codes import supports_frozen_codes
from qat.nn import QuantLinear
from qat.quantizers.base import ste_round

_MIN_SCALE = 1e-5  # as the uniform quantizer: keeps all-zero groups finite


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad): every parameter moves by exactly lr per step, whatever its gradient's scale."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """fp16 rounding in the forward (how scales are stored), identity gradient."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


class _SignRoundLayer(nn.Module):
    """SignRound's trainable state of one quantized linear: rounding offsets and clipping factors."""

    hard = True

    def __init__(self, q: nn.Module, minmax: bool):
        super().__init__()
        self.q = [q]  # not a submodule: the quantizer belongs to the student
        shape = (q.out_features, q.n_groups)
        self.V = nn.Parameter(torch.zeros(q.out_features, q.n_groups, q.group_size, device=q.scale.device))
        self.minmax = minmax
        if minmax:
            self.min_scale = nn.Parameter(torch.ones(shape, device=q.scale.device))
            self.max_scale = nn.Parameter(torch.ones(shape, device=q.scale.device))

    def grid(self, wg: torch.Tensor):
        """(s, z) [out, n_groups] for the grouped weight, as used in the forward (s fp16-rounded, z integer)."""
        q = self.q[0]
        if q.spec.sym:
            amax = wg.detach().abs().amax(-1)
            if self.minmax:
                amax = amax * self.max_scale
            s = _fp16_ste((2 * amax / q.qmax).clamp_min(_MIN_SCALE))
            return s, torch.full_like(s, 2 ** (q.spec.bits - 1))
        wmin = wg.detach().amin(-1).clamp_max(0)
        wmax = wg.detach().amax(-1).clamp_min(0)
        if self.minmax:
            wmin, wmax = wmin * self.min_scale, wmax * self.max_scale
        s = _fp16_ste(((wmax - wmin) / q.qmax).clamp_min(_MIN_SCALE))
        z = torch.clamp(ste_round(-wmin / s), 0, q.qmax)
        return s, z

    def quantize(self, weight: torch.Tensor):
        """(w_hat [out, in], s, z, q) of the latent `weight` under the current rounding state."""
        q = self.q[0]
        wg = weight.float().reshape(q.out_features, q.n_groups, q.group_size)
        s, z = self.grid(wg)
        codes = torch.clamp(ste_round(wg / s.unsqueeze(-1) + self.V) + z.unsqueeze(-1), 0, q.qmax)
        w_hat = ((codes - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(q.out_features, q.in_features)
        return w_hat, s, z, codes

    @torch.no_grad()
    def clamp_(self, rng: float) -> None:
        self.V.clamp_(-rng, rng)
        if self.minmax:
            self.min_scale.clamp_(0.0, 1.0)
            self.max_scale.clamp_(0.0, 1.0)


_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


class _AdaRoundLayer(nn.Module):
    """AdaRound's trainable state of one quantized linear: a rounding variable per weight on the quantizer's grid."""

    def __init__(self, q: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.q = [q]
        with torch.no_grad():
            s, z = q.scale_zero(weight)
            self.register_buffer("s", s.detach().clone())
            self.register_buffer("z", z.detach().clone())
            frac = self._scaled(weight) - torch.floor(self._scaled(weight))
            p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(torch.log(p) - torch.log1p(-p))  # h(V) == frac: training starts at the FP weight
        self.hard = False

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        q = self.q[0]
        return weight.detach().float().reshape(q.out_features, q.n_groups, q.group_size) / self.s.unsqueeze(-1)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    def quantize(self, weight: torch.Tensor):
        q = self.q[0]
        up = (self.V >= 0).float() if self.hard else self.h()  # h(V) >= 1/2  <=>  V >= 0
        codes = torch.clamp(torch.floor(self._scaled(weight)) + up + self.z.unsqueeze(-1), 0, q.qmax)
        w_hat = ((codes - self.z.unsqueeze(-1)) * self.s.unsqueeze(-1)).reshape(q.out_features, q.in_features)
        return w_hat, self.s, self.z, codes

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def clamp_(self, rng: float) -> None:
        pass


class RoundingLearner:
    """Learned rounding of the uniform quantizers of `modules` (one block-wise window): hooks their forward, owns the
    rounding parameters and their optimizer, keeps the best step, and bakes the result into the student."""

    method = ""
    keeps_best = True  # `best` applies (the loss of a step is the loss of the model that would be baked)

    def __init__(self, modules: dict[str, QuantLinear], spec, total_steps: int):
        bad = [n for n, m in modules.items() if not supports_frozen_codes(m.weight_quantizer)]
        if bad:
            raise ValueError(f"rounding {self.method} needs uniform weight quantizers with free scale/zero (not "
                             f"binary11, vq or lwc); {bad[0]} has {modules[bad[0]].weight_quantizer.extra_repr()}")
        self.modules, self.spec, self.total_steps = modules, spec, max(int(total_steps), 1)
        self.best_loss = float("inf")
        self.best: dict[str, torch.Tensor] | None = None
        self._handles: list = []
        self.layers = self.make_layers()
        self.opt, self.sched = self.make_optimizer()

    def make_layers(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def make_optimizer(self):
        raise NotImplementedError

    def regularizer(self, frac: float) -> torch.Tensor | None:
        """A term the stage adds to its loss at `frac` (0..1) of the window; None when the method has none."""
        return None

    # ---- wiring ---------------------------------------------------------------------------------------------------
    def attach(self, state: dict | None = None) -> RoundingLearner:
        for name, m in self.modules.items():
            layer = self.layers[name]

            def hook(_mod, args, _out, layer=layer):
                return layer.quantize(args[0])[0]

            self._handles.append(m.weight_quantizer.register_forward_hook(hook))
        if state is not None:
            self.load_state_dict(state)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    # ---- training -------------------------------------------------------------------------------------------------
    def observe(self, loss: float, extra: list[nn.Parameter] = ()) -> None:
        """Before the step: remember the current parameters (and the stage's other trained `extra` ones) if this step's
        loss is the lowest so far."""
        if not (self.spec.best and self.keeps_best) or not loss < self.best_loss:
            return
        self.best_loss = float(loss)
        self.best = {k: v.detach().clone() for k, v in self._named(extra).items()}

    def step(self) -> None:
        self.opt.step()
        self.sched.step()
        for layer in self.layers.values():
            layer.clamp_(self.spec.range)

    def _named(self, extra: list[nn.Parameter] = ()) -> dict[str, torch.Tensor]:
        out = {}
        for n, L in self.layers.items():
            for k, p in L.named_parameters():
                out[f"{n}.{k}"] = p
        for i, p in enumerate(extra):
            out[f"extra.{i}"] = p
        return out

    @torch.no_grad()
    def finish(self, extra: list[nn.Parameter] = ()) -> None:
        """Restore the best step's parameters (if tracked), bake them into the student and detach."""
        if self.best is not None:
            named = self._named(extra)
            for k, v in self.best.items():
                named[k].copy_(v)
        for layer in self.layers.values():
            layer.hard = True  # AdaRound: the hard rounding is what gets baked (SignRound is always hard)
        self.bake()
        self.detach()

    @torch.no_grad()
    def bake(self) -> None:
        """scale := s, zero := z, latent := s * (q - z): the quantizer's own forward now gives the trained weights."""
        for name, m in self.modules.items():
            q = m.weight_quantizer
            w_hat, s, z, _ = self.layers[name].quantize(m.weight)
            q.scale.copy_(s)
            q.zero.copy_(z)
            m.weight.copy_(w_hat.to(m.weight.dtype))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- checkpoint state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"params": {k: v.detach().cpu().clone() for k, v in self._named().items()},
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "best_loss": self.best_loss,
                "best": None if self.best is None else {k: v.cpu() for k, v in self.best.items()}}

    @torch.no_grad()
    def load_state_dict(self, s: dict) -> None:
        named = self._named()
        for k, v in s["params"].items():
            named[k].copy_(v)
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.best_loss = float(s["best_loss"])
        dev = next(iter(named.values())).device
        self.best = None if s["best"] is None else {k: v.to(dev) for k, v in s["best"].items()}


MIN_LR_STEPS = 50  # below this many steps a window keeps AutoRound's lr of a 50-step one (docs/METHODS.md)


def default_signround_lr(steps: int) -> float:
    """1 / steps (AutoRound's: with the linear decay a parameter moves at most 1/2 over the window), but never more
    than 1/50: at a few steps per window, steps of 1/steps on the sign of a 2-window gradient flip codes and clipping
    wholesale (W4g64, 6 steps x 2 windows per block, WikiText-2 on 4,096 tokens: 42.06 with 1/6, 34.51 with 1/50,
    RTN init 40.21)."""
    return 1.0 / max(int(steps), MIN_LR_STEPS)


class SignRound(RoundingLearner):
    method = "signround"

    def make_layers(self):
        return {n: _SignRoundLayer(m.weight_quantizer, self.spec.minmax) for n, m in self.modules.items()}

    def make_optimizer(self):
        lr = self.spec.lr if self.spec.lr is not None else default_signround_lr(self.total_steps)
        groups = [{"params": [L.V for L in self.layers.values()], "lr": lr}]
        if self.spec.minmax:
            mlr = self.spec.minmax_lr if self.spec.minmax_lr is not None else lr
            groups.append({"params": [p for L in self.layers.values() for p in (L.min_scale, L.max_scale)],
                           "lr": mlr})
        opt = SignSGD(groups, lr=lr)
        # AutoRound's schedule: linear decay from lr to 0 over the window
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / self.total_steps))


class AdaRound(RoundingLearner):
    method = "adaround"
    keeps_best = False  # its training forward is soft: a step's loss is not the hard-rounded model's
    WARMUP = 0.2  # fraction of the window without the regulariser (AdaRound's schedule)
    BETA = (20.0, 2.0)

    def make_layers(self):
        return {n: _AdaRoundLayer(m.weight_quantizer, m.weight) for n, m in self.modules.items()}

    def make_optimizer(self):
        opt = torch.optim.Adam([L.V for L in self.layers.values()],
                               lr=self.spec.lr if self.spec.lr is not None else 1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)

    def regularizer(self, frac: float) -> torch.Tensor | None:
        if frac < self.WARMUP:
            return None
        t = (frac - self.WARMUP) / (1 - self.WARMUP)
        beta = self.BETA[0] + (self.BETA[1] - self.BETA[0]) * t
        reg = torch.stack([L.regularizer(beta) for L in self.layers.values()]).mean()
        return self.spec.reg_weight * reg


ROUNDING_LEARNERS = {c.method: c for c in (SignRound, AdaRound)}
