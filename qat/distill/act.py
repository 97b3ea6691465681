"""Stage 3: activation refinement (LBLLM AAR). Weights stay frozen (the recipe refuses `latent`/`bias` here); the
activation quantizers run, and what trains is their clipping (and knee) factors, by default alone (`train: [act]`),
optionally with the weight-quantizer parameters (`[act, wq]`, LBLLM trains alpha/mu too). The objective is the
layer-wise reconstruction of stage 1 (`objective: blockwise`, LBLLM's choice) or logit distillation
(`objective: e2e`). The knee-mode soft-mask temperature is annealed geometrically from act_temperature[0] to [1]
over the stage; it is a function of the step, so a resumed run sets exactly the same values.
"""
from __future__ import annotations

from qat.distill.blockwise import BlockwiseStage
from qat.distill.e2e import E2EStage
from qat.distill.params import set_act_temperature
from qat.distill.recipe import StageSpec
from qat.distill.stage import DistillContext


class _AnnealActTemperature:
    def before_step(self) -> None:
        t = self.spec.act_temperature
        if t:
            frac = min(self.step / max(self.total_steps - 1, 1), 1.0)
            set_act_temperature(self.ctx.student, t[0] * (t[1] / t[0]) ** frac)


class ActBlockwiseStage(_AnnealActTemperature, BlockwiseStage):
    kind = "act"


class ActE2EStage(_AnnealActTemperature, E2EStage):
    kind = "act"


def make_act_stage(ctx: DistillContext, spec: StageSpec, index: int):
    if not ctx.spec.act.enabled:
        raise ValueError(f"stage {index} ({spec.name}): act stage needs activation quantization, the student is "
                         f"{ctx.spec.describe()}")
    return (ActBlockwiseStage if spec.objective == "blockwise" else ActE2EStage)(ctx, spec, index)
