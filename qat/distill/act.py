"""Stage 3: activation refinement (LBLLM AAR). Weights stay frozen (the recipe refuses `latent`/`bias` here); the
activation quantizers run, and what trains is their clipping (and knee) factors, by default alone (`train: [act]`),
optionally with the weight-quantizer parameters (`[act, wq]`, LBLLM trains alpha/mu too). The objective is the
layer-wise reconstruction of stage 1 (`objective: blockwise`, LBLLM's choice) or logit distillation
(`objective: e2e`): the registered kind ActStage builds ActBlockwiseStage or ActE2EStage, which run the block-wise or
end-to-end machinery. The knee-mode soft-mask temperature is annealed geometrically from act_temperature[0] to [1]
over the stage; it is a function of the step, so a resumed run sets exactly the same values.
"""
from __future__ import annotations

from qat.distill.blockwise import BlockwiseStage
from qat.distill.e2e import E2EStage
from qat.distill.params import set_act_temperature
from qat.distill.recipe import RecipeError, StageSpec
from qat.distill.stage import DistillContext, Stage, register_stage

ACT_OBJECTIVES = ("blockwise", "e2e")


@register_stage
class ActStage(Stage):
    """The act kind: its recipe part and the temperature annealing; build() picks the objective's variant."""

    kind = "act"
    default_train = ("act",)
    options = ("objective", "act_temperature")
    quantizes_acts = True

    @classmethod
    def block_objective(cls, spec: StageSpec) -> bool:
        return spec.objective == "blockwise"

    @classmethod
    def validate_spec(cls, spec: StageSpec, w: str) -> None:
        if any(s == "latent" or s == "bias" for s in spec.train):
            raise RecipeError(f"{w}: act stages keep the weights frozen; remove 'latent'/'bias' from train")
        if spec.objective not in ACT_OBJECTIVES:
            raise RecipeError(f"{w}: unknown act objective {spec.objective!r}; supported: {', '.join(ACT_OBJECTIVES)}")
        t = spec.act_temperature
        if t is not None and (len(t) != 2 or not (t[0] > 0 and t[1] > 0)):
            raise RecipeError(f"{w}: act_temperature needs [start, end] > 0, got {t}")

    @classmethod
    def check_quant(cls, spec: StageSpec, quant, w: str) -> None:
        if not quant.act.enabled:
            raise RecipeError(f"{w}: act stage needs activation quantization (quant.act.bits 4 or 8), the spec is "
                              f"{quant.describe()}")

    @classmethod
    def build(cls, ctx: DistillContext, spec: StageSpec, index: int) -> Stage:
        if not ctx.spec.act.enabled:
            raise ValueError(f"stage {index} ({spec.name}): act stage needs activation quantization, the student is "
                             f"{ctx.spec.describe()}")
        return (ActBlockwiseStage if cls.block_objective(spec) else ActE2EStage)(ctx, spec, index)

    def before_step(self) -> None:
        t = self.spec.act_temperature
        if t:
            frac = min(self.step / max(self.total_steps - 1, 1), 1.0)
            set_act_temperature(self.ctx.student, t[0] * (t[1] / t[0]) ** frac)


class ActBlockwiseStage(ActStage, BlockwiseStage):
    """act with objective blockwise: the block-wise windows of stage 1, activation factors training."""


class ActE2EStage(ActStage, E2EStage):
    """act with objective e2e: logit distillation of stage 2, activation factors training."""
