"""Stage 1: block-wise distillation (EfficientQAT Block-AP, LBLLM WAT, ACBQ units, CBQ windows).

The model's decoder is cut into units: whole blocks (`units: block`) or, for ACBQ, each block's attention and MLP
residual units (`units: acbq`; block == mlp_unit(attn_unit(h))). Windows of `window` consecutive units, consecutive
windows sharing `overlap` units (CBQ's sliding window), are trained one after the other, shallow to deep:

    student input   S_start: the calibration windows run through the student's *already trained* units before the
                    window (so the window learns to compensate the error of the quantized prefix)
    target          T_end: the teacher's hidden state after the window, on the FP path
    loss            block_loss(window(S_start), T_end)                 (mse | token_mse | cosine, sink weighting)
                    + block_loss(window(T_start), T_end)                if homologous (CBQ: FP-input path)
                    + w * block_loss(next units(window out), T_next)    if cross_unit_weight (ACBQ consistency)
                    + polarization of trained binary11 bitmaps
With `rounding: {method: signround}` the window also learns each weight's rounding and its groups' clipping range
(AutoRound's SignRound, qat/distill/rounding.py), baked into the student when the window ends.
Only the active window's selected parameters have requires_grad and optimizer state; when the window ends its
optimizer is dropped, bitmaps leaving it are hardened, and S advances through the units it will no longer train.

Caches: teacher hidden states are computed once per stage, boundary by boundary as the windows move (each teacher
unit runs exactly once), and kept only while a window needs them; every cache is an ActivationStore, in memory or in
a file under <run_dir>/cache above `spill_mb`. Resuming at window w recomputes S_start and the teacher boundaries it
needs from the (deterministic) embeddings with the same row chunks, which reproduces the caches bit for bit.

On several processes each one caches and trains on its own shard of the calibration rows (`rows`, fixed for the
stage by qat/data/module.py); the losses that steer the stage (first-step loss of ACBQ's adaptive weight, window_eval)
are averaged over the processes, so every process takes the same decisions.
"""
from __future__ import annotations

import torch

from qat.distill.cache import ActivationStore
from qat.distill.losses import block_loss
from qat.distill.recipe import RecipeError, StageSpec
from qat.distill.stage import DistillContext, Stage, register_stage
from qat.models import capture_block_inputs, run_block, run_unit


def make_units(n_blocks: int, kind: str) -> list[tuple[int, str]]:
    if kind == "block":
        return [(i, "block") for i in range(n_blocks)]
    return [(i, part) for i in range(n_blocks) for part in ("attn", "mlp")]


def make_windows(n_units: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end)) unit ranges: `window` units each, consecutive windows sharing `overlap` units; the last window
    is cut at the end of the model."""
    out, start = [], 0
    while True:
        end = min(start + window, n_units)
        out.append((start, end))
        if end >= n_units:
            return out
        start += window - overlap


ROUNDING_METHODS = ("none", "signround", "adaround")


@register_stage
class BlockwiseStage(Stage):
    kind = "blockwise"
    default_train = ("latent", "wq")
    options = ("rounding",)

    @classmethod
    def block_objective(cls, spec: StageSpec) -> bool:
        return True

    @classmethod
    def validate_spec(cls, spec: StageSpec, w: str) -> None:
        r = spec.rounding
        if r.method not in ROUNDING_METHODS:
            raise RecipeError(f"{w}: unknown rounding method {r.method!r}; supported: {', '.join(ROUNDING_METHODS)}")
        if r.enabled:
            if spec.freeze_codes:
                raise RecipeError(f"{w}: rounding learns the codes; it cannot run with freeze_codes")
            if any(s.split(".")[0] == "wq" for s in spec.train):
                raise RecipeError(f"{w}: rounding owns the scales and zero points while a window trains (it learns "
                                  "the clipping range); remove 'wq' from train")
            if not r.range > 0 or (r.lr is not None and not r.lr > 0) or (r.minmax_lr is not None and
                                                                            not r.minmax_lr > 0) or r.reg_weight < 0:
                raise RecipeError(f"{w}: rounding needs range > 0, positive learning rates and reg_weight >= 0")

    @classmethod
    def check_quant(cls, spec: StageSpec, quant, w: str) -> None:
        wt = quant.weight
        if spec.rounding.enabled and (wt.format != "uniform" or wt.lwc or wt.float_zero):
            raise RecipeError(f"{w}: rounding {spec.rounding.method} needs the uniform format with free scale/zero "
                              f"(not lwc or float_zero), the spec is {quant.describe()}")

    def __init__(self, ctx: DistillContext, spec: StageSpec, index: int):
        super().__init__(ctx, spec, index)
        ad = ctx.adapter
        if spec.units == "acbq" and ad.parallel_residual:
            raise ValueError(f"{self.label}: units acbq needs sequential attention/MLP residuals; "
                             f"{ad.family} blocks are parallel-residual (use units: block)")
        self.blocks_s = ad.blocks(ctx.student)
        self.blocks_t = ad.blocks(ctx.teacher)
        self.units = make_units(len(self.blocks_s), spec.units)
        self.windows = make_windows(len(self.units), spec.window, spec.overlap)
        plan = ctx.plan.stages[index]
        self.rows = plan.rows_of(ctx.dist.rank, ctx.dist.world)  # the pool rows this process caches and trains on
        self.local = torch.full((plan.n_rows,), -1, dtype=torch.long)  # pool row -> position in the caches
        self.local[self.rows] = torch.arange(len(self.rows))
        self.ids = ctx.train_ids[self.rows]
        self.steps_per_window = plan.steps_per_window
        self.total_steps = len(self.windows) * self.steps_per_window
        self.window_idx, self.step_in_window = 0, 0
        self.unit_errors: list[float] = []  # ACBQ adaptive weight: first-step loss of every window so far
        self.omega = 0.0
        self.S: ActivationStore | None = None
        self.S_at = 0
        self.T: dict[int, ActivationStore] = {}
        self.kwargs: dict = {}
        self._first_loss = float("nan")
        self._loss_before = float("nan")

    # ---- units and caches ---------------------------------------------------------------------------------------
    def unit_prefixes(self, u: int) -> list[str]:
        ad, (b, part) = self.ctx.adapter, self.units[u]
        base = f"{ad.blocks_path}.{b}"
        if part == "block":
            return [base]
        if part == "attn":
            return [f"{base}.{ad.attn}", f"{base}.{ad.attn_norm}"]
        return [f"{base}.{m}" for m in ad.mlp] + [f"{base}.{ad.mlp_norm}"]

    def run_unit(self, blocks, u: int, h: torch.Tensor) -> torch.Tensor:
        b, part = self.units[u]
        if part == "block":
            return run_block(blocks[b], h, self.kwargs)
        return run_unit(self.ctx.adapter, blocks[b], part, h, self.kwargs)

    def _store(self, t: torch.Tensor) -> ActivationStore:
        return ActivationStore.from_tensor(t, self.spec.spill_mb * 2**20, self.ctx.run_dir / "cache")

    @torch.no_grad()
    def _advance(self, store: ActivationStore, blocks, units: range) -> None:
        """Run `units` over every row of `store` in place (fixed row chunks, so replays are bit-identical)."""
        dev, b = self.ctx.device, self.ctx.infer_batch
        for u in units:
            for i in range(0, len(store), b):
                sl = slice(i, i + b)
                store.put(sl, self.run_unit(blocks, u, store.get(sl, dev)))

    @torch.no_grad()
    def _teacher_at(self, boundary: int) -> ActivationStore:
        """Teacher hidden state entering unit `boundary` (= leaving unit boundary-1), computed forward from the
        deepest boundary held."""
        if boundary in self.T:
            return self.T[boundary]
        src = max(k for k in self.T if k < boundary)
        dev, b = self.ctx.device, self.ctx.infer_batch
        prev = self.T[src]
        for u in range(src, boundary):
            nxt = ActivationStore(prev.shape, prev.dtype, prev.device, self.spec.spill_mb * 2**20,
                                  self.ctx.run_dir / "cache")
            for i in range(0, len(prev), b):
                sl = slice(i, i + b)
                nxt.put(sl, self.run_unit(self.blocks_t, u, prev.get(sl, dev)))
            self.T[u + 1] = nxt
            prev = nxt
        return self.T[boundary]

    def _needed_boundaries(self, w: int) -> list[int]:
        start, end = self.windows[w]
        need = [start, end]
        if self.spec.loss.cross_unit_weight > 0:
            need += [min(end + c + 1, len(self.units)) for c in range(self.spec.loss.cross_units)]
        return sorted(set(need))

    # ---- stage protocol -----------------------------------------------------------------------------------------
    def position(self) -> tuple[int, int]:
        return self.window_idx, self.step_in_window

    def activation_stores(self) -> list[ActivationStore]:
        return [s for s in [self.S, *self.T.values()] if s is not None]

    def begin(self, state: dict | None) -> None:
        ctx = self.ctx
        ctx.act_bypass.set(self.spec.acts_on)
        h_t, self.kwargs = capture_block_inputs(ctx.teacher, self.ids, ctx.adapter, ctx.infer_batch)
        h_s, _ = capture_block_inputs(ctx.student, self.ids, ctx.adapter, ctx.infer_batch)
        self.T = {0: self._store(h_t)}
        self.S, self.S_at = self._store(h_s), 0
        del h_t, h_s
        if state:
            self.window_idx = int(state["window"])
            self.step_in_window = int(state["step_in_window"])
            self.unit_errors = list(state["unit_errors"])
            self.omega = float(state["omega"])
            self.window_log = list(state["window_log"])
            self._first_loss = float(state.get("first_loss", float("nan")))
            self._loss_before = float(state.get("loss_before", float("nan")))
        self.step = self.window_idx * self.steps_per_window + self.step_in_window
        if not self.done:
            self._enter_window(state)

    def _enter_window(self, state: dict | None = None) -> None:
        w = self.window_idx
        start, end = self.windows[w]
        self._advance(self.S, self.blocks_s, range(self.S_at, start))
        self.S_at = start
        for bnd in self._needed_boundaries(w):
            self._teacher_at(bnd)
        for k in [k for k in self.T if k < start]:
            self.T.pop(k).close()
        self.prefixes = [p for u in range(start, end) for p in self.unit_prefixes(u)]
        self.make_trainable(self.prefixes, self.steps_per_window, allow_empty=self.spec.rounding.enabled)
        self.freeze_codes(self.prefixes, state)
        self.learn_rounding(self.prefixes, self.steps_per_window, state)
        self.bitmaps = self.bitmap_quantizers(self.prefixes)
        if state:
            self.load_opt_state(state)
        elif self.spec.window_eval:
            self._loss_before = self.full_loss()

    @torch.no_grad()
    def full_loss(self) -> float:
        """The window's main loss over every cached calibration row of every process (diagnostics, window_eval)."""
        lo, dev, b = self.spec.loss, self.ctx.device, self.ctx.infer_batch
        start, end = self.windows[self.window_idx]
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(self.S), b):
            sl = slice(i, i + b)
            out = self._forward(self.blocks_s, start, end, self.S.get(sl, dev))
            n = out.shape[0]
            total[0] += float(block_loss(out, self.T[end].get(sl, dev), lo.kind, lo.sink_weight, lo.cosine_weight)) * n
            total[1] += n
        self.ctx.dist.sum_(total)
        return float(total[0] / total[1])

    def _forward(self, blocks, start: int, end: int, h: torch.Tensor) -> torch.Tensor:
        for u in range(start, end):
            h = self.run_unit(blocks, u, h)
        return h

    def train_step(self, rows: torch.Tensor) -> dict:
        ctx, lo = self.ctx, self.spec.loss
        self.before_step()
        start, end = self.windows[self.window_idx]
        idx = self.local[rows.cpu()]  # positions in this process's caches (the module checked the rows are its own)
        dev = ctx.device
        target = self.T[end].get(idx, dev)
        out = self._forward(self.blocks_s, start, end, self.S.get(idx, dev))
        main = block_loss(out, target, lo.kind, lo.sink_weight, lo.cosine_weight)
        loss = main
        if lo.homologous:
            out_fp = self._forward(self.blocks_s, start, end, self.T[start].get(idx, dev))
            loss = loss + block_loss(out_fp, target, lo.kind, lo.sink_weight, lo.cosine_weight)
        if self.step_in_window == 0:  # averaged over the processes: every one computes the same omega
            self._first_loss = float(ctx.dist.mean_([], main.detach().float().reshape(1)))
            if lo.cross_unit_weight > 0:
                self.unit_errors.append(self._first_loss)
                mean_e = sum(self.unit_errors) / len(self.unit_errors)
                ratio = self._first_loss / mean_e if lo.adaptive_cross and mean_e > 0 else 1.0
                self.omega = lo.cross_unit_weight * min(max(ratio, 0.5), 2.0)
        if lo.cross_unit_weight > 0 and end < len(self.units):
            h = out
            for c in range(lo.cross_units):
                u = end + c
                if u >= len(self.units):
                    break
                h = self.run_unit(self.blocks_s, u, h)
                loss = loss + self.omega * block_loss(h, self.T[u + 1].get(idx, dev), lo.kind, lo.sink_weight,
                                                      lo.cosine_weight)
        frac = self.step_in_window / max(self.steps_per_window - 1, 1)
        pol = self.polarization(self.bitmaps, frac)
        if pol is not None:
            loss = loss + pol
        reg = self.rounding.regularizer(frac) if self.rounding is not None else None
        if reg is not None:  # AdaRound's push of the soft rounding to 0/1
            loss = loss + reg
        value = self.optimize(loss, main)
        self.step_in_window += 1
        self.step += 1
        if self.step_in_window == self.steps_per_window:
            self._finish_window(value)
        return {"loss": value, "main_loss": self.last_main, "tokens": int(idx.numel() * self.ids.shape[1])}

    def _finish_window(self, last_loss: float) -> None:
        w = self.window_idx
        start, end = self.windows[w]
        nxt = self.windows[w + 1][0] if w + 1 < len(self.windows) else len(self.units)
        leaving = [p for u in range(start, nxt) for p in self.unit_prefixes(u)]
        self.harden(self.bitmap_quantizers(leaving))
        entry = {"window": w, "units": [start, end], "first_loss": self._first_loss, "last_loss": last_loss,
                 "blocks": sorted({self.units[u][0] for u in range(start, end)})}
        self.finish_rounding()  # bake first: loss_after and the next window see the model as it will be exported
        self.unfreeze_codes()
        if self.spec.window_eval:
            entry.update(loss_before=self._loss_before, loss_after=self.full_loss())
        self.window_log.append(entry)
        self.release()
        self.window_idx += 1
        self.step_in_window = 0
        if w + 1 < len(self.windows):
            self._enter_window()

    def end(self) -> None:
        self.finish_rounding()
        self.unfreeze_codes()
        self.release()
        for s in self.activation_stores():
            s.close()
        self.S, self.T = None, {}

    def state_dict(self) -> dict:
        return {"window": self.window_idx, "step_in_window": self.step_in_window, "unit_errors": self.unit_errors,
                "omega": self.omega, "window_log": self.window_log, "first_loss": self._first_loss,
                "loss_before": self._loss_before,
                **(self.opt_state() if not self.done else {}), **(self.frozen_state() if not self.done else {}),
                **(self.rounding_state() if not self.done else {})}

    def where(self) -> str:
        w = min(self.window_idx, len(self.windows) - 1)
        start, end = self.windows[w]
        names = ", ".join(f"block {b}" + ("" if p == "block" else f" {p}") for b, p in self.units[start:end])
        return (f"{self.label} window {w + 1}/{len(self.windows)} [{names}] "
                f"step {self.step_in_window + 1}/{self.steps_per_window}")

    def progress(self) -> dict:
        w = min(self.window_idx, len(self.windows) - 1)
        start, end = self.windows[w]
        return {"step": self.step, "total": self.total_steps, "window": w, "n_windows": len(self.windows),
                "step_in_window": self.step_in_window, "steps_per_window": self.steps_per_window,
                "blocks": sorted({self.units[u][0] for u in range(start, end)})}
