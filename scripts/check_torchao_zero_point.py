"""What torchao 0.18's zero-point domain does to its asymmetric per-group fake quantization, before any training.

For each width, on the default model: the loss on the first 4 training windows and the weight error over every
quantized linear (all but lm_head) of min/max RTN with an integer zero point (the grid of `qat ptq --method rtn`),
of torchao's `IntxFakeQuantizeConfig(is_symmetric=False)` with the config's default integer zero-point domain, and
with `zero_point_domain=FLOAT` (float32 zero point). "clipped" counts the weights whose error exceeds half a grid
step: a min/max grid never does that, so they are weights the grid no longer covers. The figures are quoted in
scripts/bench_torchao.py and docs/quality/analysis.md. Runs in torchao's venv (see bench_torchao.py):

    .cache/venv-torchao/bin/python scripts/check_torchao_zero_point.py --model .cache/smollm2-135m \
        --windows runs/quality/calib-64x512.pt
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max asymmetric RTN with an integer zero point; returns (q-dq weight, per-weight step)."""
    g = w.reshape(-1, group)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    qmax = 2 ** bits - 1
    s = (hi - lo).clamp_min(1e-8) / qmax
    z = torch.round(-lo / s)
    q = (torch.clamp(torch.round(g / s) + z, 0, qmax) - z) * s
    return q.reshape(w.shape), s.expand_as(g).reshape(w.shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True, help="torch file holding an int64 [n, seq_len] tensor of windows")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args(argv)

    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.quant_primitives import ZeroPointDomain
    from transformers import AutoModelForCausalLM

    x = torch.load(a.windows, weights_only=True).long()[:4]

    def load():
        m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        return m, [(n, mod) for n, mod in m.named_modules()
                   if isinstance(mod, torch.nn.Linear) and mod is not m.get_output_embeddings()]

    def loss(m) -> float:
        with torch.no_grad():
            return round(float(m(input_ids=x, labels=x, use_cache=False).loss), 4)

    m, _ = load()
    out = {"fp_loss": loss(m)}
    for bits in a.bits:
        m, lins = load()
        ref = {n: (mod.weight.detach().clone(), *rtn(mod.weight.detach(), bits, a.group_size)) for n, mod in lins}
        with torch.no_grad():
            for n, mod in lins:
                mod.weight.copy_(ref[n][1])
        rows = {"rtn_int_zero": {"loss": loss(m)}}
        for name, kw in (("torchao_int_zero", {}),
                         ("torchao_float_zero", {"zero_point_domain": ZeroPointDomain.FLOAT,
                                                 "zero_point_precision": torch.float32})):
            m, lins = load()
            cfg = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=a.group_size, is_symmetric=False,
                                         **kw)
            head = m.get_output_embeddings()
            quantize_(m, QATConfig(weight_config=cfg, step="prepare"),
                      filter_fn=lambda mod, _fqn, head=head: isinstance(mod, torch.nn.Linear) and mod is not head)
            clipped = total = 0
            sq = 0.0
            with torch.no_grad():
                for n, _ in lins:
                    lin = m.get_submodule(n)
                    w, _, step = ref[n]
                    err = (lin.weight_fake_quantizer(lin.weight) - w).abs()
                    clipped += int((err > step / 2 + 1e-6).sum())
                    total += w.numel()
                    sq += float(err.pow(2).sum())
            rows[name] = {"loss": loss(m), "clipped_fraction": round(clipped / total, 5),
                          "weight_mse": float(f"{sq / total:.4g}")}
        sq = sum(float((q - w).pow(2).sum()) for w, q, _ in ref.values())
        rows["rtn_int_zero"]["weight_mse"] = float(f"{sq / sum(w.numel() for w, _, _ in ref.values()):.4g}")
        out[f"int{bits}"] = rows
        print(json.dumps({f"int{bits}": rows}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
