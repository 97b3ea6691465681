"""Data layer: local text/jsonl files -> token ids -> windows; StepDataModule, the per-process step loader of
`qat distill` (qat/data/module.py, imported lazily, so `qat eval` never imports lightning)."""
from qat.data.text import (
    load_sequences,
    pack_windows,
    read_json_documents,
    read_text,
    sample_windows,
    save_sequences,
    tokenize,
    tokenize_file,
)

__all__ = ["StepDataModule", "load_sequences", "pack_windows", "read_json_documents", "read_text", "sample_windows",
           "save_sequences", "tokenize", "tokenize_file"]


def __getattr__(name: str):
    if name == "StepDataModule":
        from qat.data.module import StepDataModule

        return StepDataModule
    raise AttributeError(f"module 'qat.data' has no attribute {name!r}")
