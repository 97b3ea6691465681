"""Peak GPU memory per stage of `qat distill` for large models on 1, 8 and 64 GPUs, computed (not measured) from the
architectures' shapes; docs/SCALING.md writes the arithmetic out and holds the tables this prints.

    python scripts/scaling_memory.py [--windows 512 --seq-len 2048 --group-size 64]

What is counted is what `qat distill` keeps (qat/distill): teacher weights and the student's latent weights in
float32, the weight quantizer's scale and zero point (two float32 per group of G weights), AdamW state (two float32)
and a float32 gradient per trained parameter, activation caches in float32, one row of seq-len tokens per GPU and step
(the global batch is a multiple of the number of GPUs).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
F32 = 4


@dataclass(frozen=True)
class Arch:
    name: str
    layers: int
    d: int  # hidden size
    ff: int  # MLP intermediate size
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def block_linear(self) -> int:
        """Parameters of one decoder block's linears (q, k, v, o, gate, up, down)."""
        kv = self.d * self.d * self.kv_heads // self.heads
        return 2 * self.d * self.d + 2 * kv + 3 * self.d * self.ff

    @property
    def block(self) -> int:
        return self.block_linear + 2 * self.d  # + two RMSNorm weights

    @property
    def outside(self) -> int:
        """Embedding, final norm and LM head (not in a block)."""
        return self.vocab * self.d * (1 if self.tied else 2) + self.d

    @property
    def total(self) -> int:
        return self.layers * self.block + self.outside

    def saved_per_token(self) -> int:
        """Floats one block keeps per token for its backward (inputs of the norms and linears, q/k/v, attention
        output, gate/up outputs and their product; SDPA attention keeps no [L, L] matrix): ~10 d + 4 ff."""
        return 10 * self.d + 4 * self.ff


ARCHS = [
    Arch("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000),
    Arch("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256),
    Arch("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256),
]


def stage1(a: Arch, gpus: int, n: int, L: int, g: int) -> list[float]:
    """Working set of one block-wise window (one block, trains latent + wq): [teacher block + student block,
    AdamW + gradient of the trained parameters, the dequantized weights kept for backward, the three caches of this
    GPU's n / gpus rows (student input, teacher input and output of the window), one row through the block]."""
    trained = a.block_linear * (1 + 2 / g)
    return [F32 * a.block + F32 * (a.block + 2 * a.block_linear / g), 3 * F32 * trained, F32 * a.block_linear,
            3 * F32 * (n / gpus) * L * a.d, F32 * L * a.saved_per_token()]


def resident(a: Arch, gpus: int, g: int, sharded: bool) -> float:
    """Teacher + student weights held on a GPU besides the working set: whole (DDP), or the decoder blocks sharded
    and the rest whole (FSDP)."""
    blocks, outside = a.layers * (a.block + a.block_linear * 2 / g), a.outside
    teacher = a.layers * a.block
    if sharded:
        return F32 * (teacher + blocks) / gpus + 2 * F32 * outside
    return F32 * (teacher + blocks) + 2 * F32 * outside


def stage2(a: Arch, gpus: int, L: int, g: int, checkpointing: bool) -> list[float]:
    """End-to-end with FSDP, trains wq: [teacher + student (blocks sharded, the rest whole), AdamW + gradient of the
    scales and zero points (sharded), logits of teacher and student with a log-softmax copy each, what the forward
    keeps for backward]. Without activation checkpointing the forward keeps every block's activations and the
    dequantized weight of every linear (a whole-size tensor FSDP does not shard); with it, each block's input plus one
    block's activations and dequantized weights, recomputed in backward."""
    models = resident(a, gpus, g, sharded=True)
    opt = 3 * F32 * a.layers * a.block_linear * 2 / g / gpus
    logits = 4 * F32 * L * a.vocab
    if checkpointing:
        kept = F32 * L * (a.layers * a.d + a.saved_per_token()) + F32 * a.block_linear
    else:
        kept = F32 * a.layers * (L * a.saved_per_token() + a.block_linear)
    return [models, opt, logits, kept]


def fmt(xs: list[float]) -> str:
    parts = " + ".join(f"{x / GB:.1f}" for x in xs)
    return f"{parts} = **{sum(xs) / GB:.1f}**"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=512, help="calibration windows cached by stage 1 (all GPUs)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=64)
    a = p.parse_args()
    n, L, g = a.windows, a.seq_len, a.group_size
    print(f"{n} windows x {L} tokens, group size {g}, float32, one row per GPU and step; GB = 1e9 bytes.\n")
    print("Stage 1 (block-wise), per GPU: block pair + AdamW/grad + dequantized weights + caches + one row = working "
          "set; plus the resident models\n")
    print("| model | GPUs | working set (GB) | + models, DDP | + models, FSDP |")
    print("| --- | ---: | --- | ---: | ---: |")
    for arch in ARCHS:
        for gpus in (1, 8, 64):
            print(f"| {arch.name} | {gpus} | {fmt(stage1(arch, gpus, n, L, g))} | "
                  f"{resident(arch, gpus, g, False) / GB:.0f} | {resident(arch, gpus, g, True) / GB:.1f} |")
    print("\nStage 2 (end-to-end, FSDP), per GPU: models + AdamW/grad + logits + kept for backward\n")
    print("| model | GPUs | without activation checkpointing (GB) | with block checkpointing (GB) |")
    print("| --- | ---: | --- | --- |")
    for arch in ARCHS:
        for gpus in (1, 8, 64):
            print(f"| {arch.name} | {gpus} | {fmt(stage2(arch, gpus, L, g, False))} | "
                  f"{fmt(stage2(arch, gpus, L, g, True))} |")


if __name__ == "__main__":
    main()
