"""The `qat` command. Each subcommand lives beside the code it drives, in a module exposing
`register(subparsers)` (adds its parser and sets `func`); this file only dispatches and turns expected errors into one
clear line on stderr and exit status 2 (set QAT_DEBUG=1 for the full traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module that registers it (imported only when needed: `qat eval` never pays for lightning)
SUBCOMMANDS = {
    "convert-gguf": "qat.models.convert_gguf",
    "ptq": "qat.ptq.command",
    "eval": "qat.eval.command",
    "distill": "qat.distill.command",
    "export": "qat.export.command",
    "generate": "qat.export.generate",
    "finetune": "qat.finetune.command",
    "merge": "qat.finetune.merge",
}


class CLIError(Exception):
    """An expected, user-facing error: printed as one line, no traceback."""


def _expected_errors():
    from qat.config import QuantConfigError
    from qat.models import UnsupportedArchitectureError

    # OSError: a path that cannot be used (missing, taken, under a file, no permission, disk full) is bad input too
    return (CLIError, QuantConfigError, UnsupportedArchitectureError, OSError, ValueError)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line too (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="qat", description="Quantization-aware distillation of LLMs to 1-4 bits.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    wanted = [a for a in argv if a in SUBCOMMANDS][:1] or list(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        if name in wanted:
            importlib.import_module(SUBCOMMANDS[name]).register(sub)
        else:  # listed in --help without importing its module
            sub.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except _expected_errors() as e:
        if os.environ.get("QAT_DEBUG"):  # full traceback for bug reports
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qat {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
