"""torchao quantization-aware training on the default model, for the side-by-side in docs/RESULTS.md.

torchao's own QAT API (`QATConfig` + `IntxFakeQuantizeConfig`: int-N group-wise asymmetric fake quantization of every
linear but lm_head, min/max computed each step; see --zero-point-domain), fine-tuned with plain next-token
cross-entropy (AdamW) on the same token windows our recipes train on (a tensor file written by
scripts/bench_quality.py), for a given number of steps. The result is saved as an ordinary HF checkpoint whose linear
weights are their fake-quantized values, so bench_quality evaluates it with `qat eval` like every other row. Runs in
its own environment; imports nothing from qat.

    python -m venv .cache/venv-torchao && .cache/venv-torchao/bin/pip install torch==2.13.0 torchao==0.18.0 transformers
    .cache/venv-torchao/bin/python scripts/bench_torchao.py --model .cache/smollm2-135m \
        --windows runs/quality/train-256x512.pt --bits 2 --group-size 64 --steps 74 --batch-size 4 --out runs/quality/tao
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True, help="torch file holding an int64 [n, seq_len] tensor of token windows")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    # torchao 0.18's asymmetric per-group fake quantizer computes its scales and zero points in the float-zero-point
    # convention (unsigned range, zero = min + 2^(n-1) * scale) whatever the config's domain says, then casts the zero
    # point to int32 and applies it with the signed range in the integer domain: groups whose weights are not centred
    # lose their extremes (1.4% of all weights at int4; loss before training 4.94 against 3.34 for min/max RTN:
    # scripts/check_torchao_zero_point.py). "float" keeps the two conventions consistent (a float32 zero point in the float domain, torchao's int4
    # weight-only numerics): the grid spans each group's min..max exactly. "int" is the config's default, kept to
    # reproduce the rows measured with it.
    ap.add_argument("--zero-point-domain", choices=["float", "int"], default="float")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torchao
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(a.seed)
    windows = torch.load(a.windows, weights_only=True).long()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    head = model.get_output_embeddings()
    from torchao.quantization.quant_primitives import ZeroPointDomain

    domain = {"float": {"zero_point_domain": ZeroPointDomain.FLOAT, "zero_point_precision": torch.float32},
              "int": {}}[a.zero_point_domain]
    wcfg = IntxFakeQuantizeConfig(getattr(torch, f"int{a.bits}"), group_size=a.group_size, is_symmetric=False,
                                  **domain)
    quantize_(model, QATConfig(weight_config=wcfg, step="prepare"),
              filter_fn=lambda m, _fqn: isinstance(m, torch.nn.Linear) and m is not head)
    t0 = time.time()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / a.steps)))  # cosine
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(windows), generator=g)
    cursor, losses = 0, []
    for step in range(a.steps):
        if cursor + a.batch_size > len(order):
            order, cursor = torch.randperm(len(windows), generator=g), 0
        x = windows[order[cursor: cursor + a.batch_size]]
        cursor += a.batch_size
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        print(f"step {step + 1}/{a.steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    seconds = time.time() - t0
    # materialise: every fake-quantized linear becomes a plain nn.Linear holding its quantize-dequantize weight
    model.eval()
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            fq = getattr(m, "weight_fake_quantizer", None)
            if fq is None:
                continue
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.copy_(fq(m.weight))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    info = {"version": torchao.__version__, "bits": a.bits, "group_size": a.group_size, "steps": a.steps,
            "batch_size": a.batch_size, "seq_len": int(windows.shape[1]), "lr": a.lr,
            "zero_point_domain": a.zero_point_domain, "first_loss": losses[0],
            "last_loss": losses[-1], "seconds": round(seconds, 1),
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "command": "python scripts/bench_torchao.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(a.out, "torchao_run.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
