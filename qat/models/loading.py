"""Loading models from local paths only (no hub access at run time)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def resolve_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        hint = " (hub names cannot be downloaded here: pass a local Hugging Face model directory, e.g. one written" \
               " by `qat convert-gguf`)" if "/" in str(path) and not p.exists() else ""
        raise FileNotFoundError(f"model path {str(path)!r} does not exist or is not a directory{hint}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(p)!r} has no config.json; not a Hugging Face model directory")
    return p


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(path)), local_files_only=True)


def load_fp_model(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A floating-point HF causal LM from a local directory, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = resolve_model_dir(path)
    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    from qat.models import get_adapter

    get_adapter(cfg.model_type)  # unsupported architectures fail before the weights are read
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def load_any(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) for either an FP model directory or a qat student checkpoint."""
    from qat.checkpoint import STUDENT_META, load_student

    p = resolve_model_dir(path)
    if (p / STUDENT_META).is_file():
        model, _meta = load_student(p, dtype=dtype, device=device)
    else:
        model = load_fp_model(p, dtype=dtype, device=device)
    return model, load_tokenizer(p)


def meta_model(path):
    """The architecture of a local model directory, built on the meta device (no weights read, no memory used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter

    cfg = AutoConfig.from_pretrained(str(resolve_model_dir(path)), local_files_only=True)
    get_adapter(cfg.model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)
