"""Block-sequential post-training quantization: the student is built block by block, each block calibrated on the
hidden states produced by the *already quantized* blocks before it (so it compensates their error), as GPTQ does.

    RTN   every weight quantizer's init_from(weight) (min/max; EM; nearest codeword, depending on the format)
    GPTQ  init_from(weight, hessian=H) with H from the block's calibration inputs (GPTQ / EM+GPTQ / BlockLDLQ)
Activation quantizers (A4/A8) are initialised from the same calibration inputs in both cases.

On several processes (`dist`, qat distill on N ranks) the calibration rows are dealt round-robin in chunks of
`batch_size` rows: each process runs only its chunks through the blocks, the statistics are summed over the processes
(qat.ptq.calibration), and the block's linears are dealt round-robin too: each is quantized by one process and
broadcast to the others. Every process ends with the same student, equal to a one-process run over the same rows.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from qat.config import QuantSpec
from qat.dist import SINGLE, Dist
from qat.models import capture_block_inputs, get_adapter, run_block
from qat.nn import QuantLinear, quant_disabled, quantize_model
from qat.ptq.calibration import attach_input_stats

PTQ_METHODS = ("rtn", "gptq")


@torch.no_grad()
def ptq_quantize(model, spec: QuantSpec, calib_ids: torch.Tensor | None, method: str = "gptq", *,
                 act_order: bool = True, damp: float = 0.01, batch_size: int = 8, act_sample_tokens: int = 4096,
                 progress: bool = True, dist: Dist = SINGLE) -> list[str]:
    """Quantize `model` in place; returns the names of the quantized linears."""
    if method not in PTQ_METHODS:
        raise ValueError(f"unknown PTQ method {method!r}; supported: {', '.join(PTQ_METHODS)}")
    needs_data = method == "gptq" or spec.act.enabled
    if needs_data and (calib_ids is None or calib_ids.numel() == 0):
        raise ValueError(f"PTQ method {method!r}{' with activation quantization' if spec.act.enabled else ''} "
                         "needs calibration data (--data)")
    adapter = get_adapter(model)
    names = quantize_model(model, spec, adapter, init=not needs_data)
    if not needs_data:
        return names
    model.eval()
    n_chunks = -(-calib_ids.shape[0] // batch_size)
    chunks = list(dist.mine(n_chunks))  # this process's calibration chunks (all of them on one process; maybe none)
    hidden, kwargs = None, None
    if chunks:
        my_ids = torch.cat([calib_ids[c * batch_size: (c + 1) * batch_size] for c in chunks])
        hidden, kwargs = capture_block_inputs(model, my_ids, adapter, batch_size)
    keep_tokens = act_sample_tokens if spec.act.enabled else 0
    keep_chunks = -(-keep_tokens // (batch_size * calib_ids.shape[1])) if keep_tokens else 0
    blocks = adapter.blocks(model)
    running = {"chunk": 0}  # the calibration chunk being run (orders the activation samples across processes)
    for i in tqdm(range(len(blocks)), desc=f"PTQ {method} {spec.describe()}", disable=not progress or dist.rank > 0,
                  unit="block"):
        block = blocks[i]
        qlins = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        stats, remove = attach_input_stats(qlins, keep_tokens=keep_tokens, keep_chunks=keep_chunks,
                                           transform=lambda m, x: m.rotate_input(x), chunk=lambda: running["chunk"])
        try:
            with quant_disabled(block):  # calibrate on the FP block fed by the quantized prefix
                for k, c in enumerate(chunks):
                    running["chunk"] = c
                    run_block(block, hidden[k * batch_size: (k + 1) * batch_size], kwargs)
        finally:
            remove()
        for k, (n, m) in enumerate(qlins.items()):
            stats[n].reduce(dist)
            if dist.owner(k) != dist.rank:
                continue
            H = stats[n].hessian() if method == "gptq" else None
            seed = i * 100 + k  # per-layer randomness (VQ sign vectors) that differs between layers
            m.weight.copy_(m.weight_quantizer.init_from(m.weight, hessian=H, act_order=act_order, damp=damp,
                                                        seed=seed))
            if m.act_quantizer is not None:
                m.act_quantizer.init_from(stats[n].sample())
        del stats
        if dist.active:  # each linear (weight, quantizer parameters and buffers) from the process that quantized it
            for k, m in enumerate(qlins.values()):
                for t in m.state_dict().values():
                    dist.broadcast_(t.view(torch.uint8) if t.dtype == torch.bool else t, src=dist.owner(k))
        for j in range(0, len(chunks) * batch_size, batch_size):  # the next block sees this block's quantized output
            hidden[j : j + batch_size] = run_block(block, hidden[j : j + batch_size], kwargs)
    return names
