"""Does a loaded quantized model agree with its quant spec? Value checks for students and native exports.

Shapes are checked where the tensors are read (group size, vq_dim, bits of the packed codes: qat.models.loading.
check_tensor_file against what the spec's own quantizer holds or pack()s). Here are the value ranges a spec implies:

    native export (stored values are the effective ones, so checks are exact)
        uniform   zeros <= 2^bits - 1 (symmetric: == 2^(bits-1)); scales finite and > 0
        binary11  alpha finite and > 0; mu finite
        vq        A, b, s_u, s_v finite; signs_in/out in {-1, +1}; hadamard_blocks equal to what the spec builds
        act       clip/knee factors finite, in (0, 1];  rotation signs in {-1, +1}
    student (latent tensors; what the forward uses is clamped, so the checks allow what training can produce)
        every quantizer tensor finite; uniform zero points within one step of the grid [0, 2^bits - 1] (the clamp
        stops a zero point's gradient within half a step of the grid, so training cannot carry it further); a
        symmetric grid's zero point exactly 2^(bits-1) (it never trains); vq signs in {-1, +1}; input-rotation
        signs equal to what the spec builds (they are fixed at construction, seeded by the layer's position)
Codes need no check: packed codes of b bits cannot leave [0, 2^b), and a student's codes are clamped by construction.
A student's spec is also compared with the one its safetensors file was written with (qat.checkpoint).
"""
from __future__ import annotations

import torch

from qat.config import QuantSpec

SIGN_BUFFERS = ("signs_in", "signs_out", "rotation_signs")
FIXED_BUFFERS = ("rotation_signs",)  # set at construction, never by init_from or training


def _fail(where: str, name: str, what: str, spec: QuantSpec) -> None:
    raise ValueError(f"{where}: {name} {what}, which {spec.describe()} cannot hold (the spec and the tensors disagree)")


def _finite(where: str, name: str, t: torch.Tensor, spec: QuantSpec) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        _fail(where, name, "contains NaN or inf", spec)


def _signs(where: str, name: str, t: torch.Tensor, spec: QuantSpec) -> None:
    if not ((t == 1) | (t == -1)).all():
        _fail(where, name, "holds values other than -1/+1", spec)


def fixed_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fixed-by-construction buffers of a freshly built student (compared after its state is loaded)."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in FIXED_BUFFERS}


@torch.no_grad()
def verify_student(model: torch.nn.Module, spec: QuantSpec, where: str, fixed: dict[str, torch.Tensor]) -> None:
    """Raise ValueError (one line naming the tensor) if a loaded student's quantizer state cannot come from `spec`."""
    from qat.nn import quant_linears

    qmax = 2**spec.weight.bits - 1
    for lname, q in quant_linears(model).items():
        for n, t in q.named_parameters():
            if n != "weight" and n != "bias":
                _finite(where, f"{lname}.{n}", t, spec)
        wq = q.weight_quantizer
        if spec.weight.format == "uniform" and not spec.weight.lwc:
            z = wq.zero.detach()
            if spec.weight.sym:
                if not (z == 2 ** (spec.weight.bits - 1)).all():
                    _fail(where, f"{lname}.weight_quantizer.zero", f"is not the symmetric mid-point "
                          f"{2 ** (spec.weight.bits - 1)} everywhere (max {float(z.max()):g})", spec)
            elif z.min() < -1 or z.max() > qmax + 1:
                _fail(where, f"{lname}.weight_quantizer.zero", f"ranges over [{float(z.min()):g}, {float(z.max()):g}], "
                      f"outside the {spec.weight.bits}-bit grid [0, {qmax}]", spec)
    for n, b in model.named_buffers():
        if n.rsplit(".", 1)[-1] in SIGN_BUFFERS:
            _signs(where, n, b, spec)
        if n in fixed and not torch.equal(b.cpu(), fixed[n].cpu()):
            _fail(where, n, "differs from the signs the spec builds", spec)


@torch.no_grad()
def verify_packed(where: str, name: str, spec: QuantSpec, packed: dict[str, torch.Tensor],
                  act: dict[str, torch.Tensor], signs: torch.Tensor | None, expected: dict[str, torch.Tensor]) -> None:
    """One packed layer of a native export (keys relative to the module); `expected` holds what the spec's own pack()
    gives for a layer of this shape (values of the fixed integer tensors included)."""
    w = spec.weight
    for k, t in {**packed, **{f"act_quantizer.{k}": v for k, v in act.items()}}.items():
        _finite(where, f"{name}.{k}", t, spec)
    if w.format == "uniform":
        qmax = 2**w.bits - 1
        z = packed["zeros"]
        if w.sym and not (z == 2 ** (w.bits - 1)).all():
            _fail(where, f"{name}.zeros", f"are not the symmetric mid-point {2 ** (w.bits - 1)}", spec)
        if not w.float_zero and int(z.max()) > qmax:  # float zero points (a merged QA-LoRA adapter) may leave the grid
            _fail(where, f"{name}.zeros", f"reach {int(z.max())}, outside the {w.bits}-bit grid [0, {qmax}]", spec)
        if not (packed["scales"] > 0).all():
            _fail(where, f"{name}.scales", "are not all positive", spec)
    elif w.format == "binary11":
        if not (packed["alpha"] > 0).all():
            _fail(where, f"{name}.alpha", "is not all positive", spec)
    elif w.format == "vq":
        _signs(where, f"{name}.signs_in", packed["signs_in"], spec)
        _signs(where, f"{name}.signs_out", packed["signs_out"], spec)
        if not torch.equal(packed["hadamard_blocks"].cpu(), expected["hadamard_blocks"].cpu()):
            _fail(where, f"{name}.hadamard_blocks", "differ from the block sizes the spec builds", spec)
    for k, v in act.items():
        if not (0 < float(v) <= 1):
            _fail(where, f"{name}.act_quantizer.{k}", f"is {float(v):g}, outside (0, 1]", spec)
    if signs is not None:
        _signs(where, f"{name}.rotation_signs", signs, spec)
