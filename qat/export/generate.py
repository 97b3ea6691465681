"""`qat generate --model DIR --prompt "..." [--max-new-tokens 60] [--greedy | --temperature T --top-p P] [--seed S]`

DIR may be a native or compressed-tensors export, a student checkpoint or an FP model directory (one loader for all:
qat.models.loading.load_model). Prints the generated text on stdout and the speed on stderr.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from qat.export.pack import DTYPES


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from an export, a student checkpoint or an FP model")
    p.add_argument("--model", required=True, help="export dir, student checkpoint or HF model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=60)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --temperature)")
    mode.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--adapter", default=None, help="a LoRA adapter written by qat finetune for this model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: float16 on GPU, float32 on CPU")
    p.set_defaults(func=run)


def load_for_generation(path, device="cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for any directory `qat generate` accepts (qat.models.loading.load_model, checked)."""
    from qat.models.loading import load_model

    loaded = load_model(path, dtype=dtype, device=device)
    return loaded.model, loaded.tokenizer


def generate_ids(model, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float | None = None,
                 top_p: float = 1.0, seed: int = 0, eos_token_id=None, pad_token_id=None) -> torch.Tensor:
    """New token ids [1, n] (greedy when temperature is None)."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    torch.manual_seed(seed)
    kw = {"do_sample": False} if temperature is None else \
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kw)
    return out[:, input_ids.shape[1]:]


def run(args: argparse.Namespace) -> int:
    from qat.models.loading import resolve_device

    if not args.prompt and not args.chat:
        raise ValueError("--prompt is empty; give the text to continue")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]
    model, tok = load_for_generation(args.model, device=device, dtype=dtype)
    if args.adapter:
        from qat.finetune.lora import load_adapter

        model = load_adapter(model, args.adapter)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("--prompt encodes to no tokens; give the text to continue")
    ids = ids.to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():  # warm-up outside the timing (one-off dequantization, allocator, kernel compiles)
        model(ids[:, :1])
    t0 = time.perf_counter()
    new = generate_ids(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_token_id, pad_token_id=pad)
    dt = time.perf_counter() - t0
    print(tok.decode(new[0], skip_special_tokens=True))
    n = new.shape[1]
    print(f"[{n} new tokens in {dt:.2f} s: {n / dt:.1f} tokens/s on {device}, {str(dtype).removeprefix('torch.')}]",
          file=sys.stderr)
    return 0
