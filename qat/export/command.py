"""`qat export --student DIR --output OUT [--overwrite] [--format native|compressed-tensors] [--dtype float16]`"""
from __future__ import annotations

import argparse

from qat.export.pack import DTYPES


def register(sub) -> None:
    p = sub.add_parser("export", help="pack a student checkpoint into a deployable directory",
                       description="Write a student's quantized layers as packed tensors (native: read back with "
                                   "qat.load_quantized; compressed-tensors: pack-quantized, read by "
                                   "transformers/vLLM with compressed-tensors installed).")
    p.add_argument("--student", required=True, help="student checkpoint directory (qat ptq / qat distill output)")
    p.add_argument("--output", required=True, help="export directory to write (complete or absent, never half)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--format", choices=["native", "compressed-tensors"], default="native")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="dtype of the floating-point tensors (embeddings, norms, lm_head, biases)")
    p.set_defaults(func=run)


def export_student(student_dir, output, *, fmt: str = "native", dtype="float16", overwrite: bool = False):
    """Read a student checkpoint and export it; returns the ExportReport."""
    from qat.checkpoint import student_spec
    from qat.export.pack import export_native, parse_dtype
    from qat.io import claim_output
    from qat.models.loading import check_kind, load_model, load_tokenizer

    # every cheap check before the (slow) load, so a wrong path or format costs nothing
    check_kind(student_dir, ("student",), "--student")
    spec = student_spec(student_dir)
    dt = parse_dtype(dtype)
    if fmt == "compressed-tensors":
        from qat.export.compressed_tensors import check_compressed_tensors_spec, export_compressed_tensors

        check_compressed_tensors_spec(spec)
        writer = export_compressed_tensors
    elif fmt == "native":
        writer = export_native
    else:
        raise ValueError(f"unknown export format {fmt!r}; supported: native, compressed-tensors")
    with claim_output(output, "export", overwrite=overwrite, inputs={"--student": student_dir}):
        model = load_model(student_dir, accept=("student",), what="--student", tokenizer=False).model
        try:
            tok = load_tokenizer(student_dir)
        except (OSError, ValueError):  # a checkpoint saved without tokenizer files still exports
            tok = None
        return writer(model, tok, spec, output, dtype=dt, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    report = export_student(args.student, args.output, fmt=args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(report.summary())
    return 0
