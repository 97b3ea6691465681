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

    for lname, q in quant_linears(model).items():
        for n, t in q.named_parameters():
            if n != "weight" and n != "bias":
                _finite(where, f"{lname}.{n}", t, spec)
        for n, problem in q.weight_quantizer.check_state():
            _fail(where, f"{lname}.weight_quantizer.{n}", problem, spec)
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
    for k, problem in w.quantizer_class().check_packed(w, packed, expected):  # the format's own value ranges
        _fail(where, f"{name}.{k}", problem, spec)
    for k, v in act.items():
        if not (0 < float(v) <= 1):
            _fail(where, f"{name}.act_quantizer.{k}", f"is {float(v):g}, outside (0, 1]", spec)
    if signs is not None:
        _signs(where, f"{name}.rotation_signs", signs, spec)
