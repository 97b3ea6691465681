"""Stage 2: end-to-end distillation (EfficientQAT E2E-QP, BitDistiller, LC-QAT).

The whole student runs on batches of training windows against the frozen FP teacher, whose logits are computed on the
fly under no_grad (caching [N, L, vocab] logits would cost far more disk than recomputing them: 25 GB in float32 for
256 windows of 512 tokens of a 49k vocabulary). Both models' logits are dropped before the backward pass, which does
not need them (the chunked losses of losses.py keep only the gradient). Loss: kl | reverse_kl
| cakld | ce on the logits (qat/distill/losses.py), + ce_weight * next-token CE, + hidden_weight * token_mse over every
block's output hidden state, + polarization of trained binary11 bitmaps. What trains is the recipe's `train` list over
the whole model: e.g. [wq.scale] for EfficientQAT's E2E-QP (step sizes only), [wq] for all quantizer parameters, or
[latent, wq] for full QAT.
"""
from __future__ import annotations

import torch

from qat.distill.losses import block_loss, logits_loss, next_token_ce, teacher_confidence
from qat.distill.recipe import StageSpec
from qat.distill.stage import DistillContext, Stage, register_stage

GAMMA_WINDOWS = 16  # windows used to estimate the teacher confidence of CAKLD


@register_stage
class E2EStage(Stage):
    kind = "e2e"
    default_train = ("wq",)

    def __init__(self, ctx: DistillContext, spec: StageSpec, index: int):
        super().__init__(ctx, spec, index)
        self.ids = ctx.train_ids
        self.total_steps = ctx.plan.stages[index].total
        self.gamma: float | None = None

    def begin(self, state: dict | None) -> None:
        ctx = self.ctx
        ctx.act_bypass.set(self.spec.acts_on)
        self.make_trainable(None, self.total_steps)
        self.freeze_codes(None, state)
        self.bitmaps = self.bitmap_quantizers(None)
        if state:
            self.step = int(state["step"])
            self.gamma = state.get("gamma")
            self.load_opt_state(state)
        if self.spec.loss.kind == "cakld" and self.gamma is None:
            self.gamma = teacher_confidence(ctx.teacher, self.ids[:GAMMA_WINDOWS], ctx.infer_batch, ctx.dist,
                                            lockstep=ctx.sharded)

    def train_step(self, rows: torch.Tensor) -> dict:
        ctx, lo = self.ctx, self.spec.loss
        self.before_step()
        x = self.ids[rows.cpu()].to(ctx.device)
        hidden = lo.hidden_weight > 0
        need_teacher = lo.kind != "ce" or hidden
        t_out = None
        if need_teacher:
            with torch.no_grad():
                t_out = ctx.teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
        s_out = ctx.student(input_ids=x, use_cache=False, output_hidden_states=hidden)
        main = logits_loss(lo.kind, s_out.logits, None if t_out is None else t_out.logits, x,
                           temperature=lo.temperature, gamma=self.gamma)
        loss = main
        if lo.ce_weight > 0:
            loss = loss + lo.ce_weight * next_token_ce(s_out.logits, x)
        if hidden:
            pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
            h = torch.stack([block_loss(s, t, "token_mse", lo.sink_weight) for s, t in pairs]).mean()
            loss = loss + lo.hidden_weight * h
        pol = self.polarization(self.bitmaps, self.step / max(self.total_steps - 1, 1))
        if pol is not None:
            loss = loss + pol
        del t_out, s_out  # the [B, L, vocab] logits are not needed by the backward pass: free them before it
        value = self.optimize(loss, main)
        self.step += 1
        return {"loss": value, "main_loss": self.last_main, "tokens": int(x.numel())}

    def end(self) -> None:
        self.unfreeze_codes()
        self.harden(self.bitmaps)
        self.release()

    def state_dict(self) -> dict:
        return {"step": self.step, "gamma": self.gamma,
                **(self.opt_state() if not self.done else {}), **(self.frozen_state() if not self.done else {})}

    def where(self) -> str:
        return f"{self.label} step {min(self.step + 1, self.total_steps)}/{self.total_steps}"
