"""Data layer: local text/jsonl files -> token ids -> windows; TextDataModule for training (imported lazily, so
`qat eval` never imports lightning)."""
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

__all__ = ["TextDataModule", "load_sequences", "pack_windows", "read_json_documents", "read_text", "sample_windows",
           "save_sequences", "tokenize", "tokenize_file"]


def __getattr__(name: str):
    if name == "TextDataModule":
        from qat.data.module import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'qat.data' has no attribute {name!r}")
