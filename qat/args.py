"""jsonargparse pieces shared by the commands that parse dataclass schemas (`qat ptq`, `qat distill`, `qat finetune`).

add_quant_arguments() is the one definition of the quant keys (--quant.weight.format, --quant.act.sym, ...): `qat ptq`
and recipes get the same names, types, docs and checks from qat.config.QuantSpec (whose WeightSpec fields come from
the formats in qat/quantizers), so the two commands cannot drift.
"""
from __future__ import annotations

import argparse
from typing import Any

from qat.config import QuantConfigError, QuantSpec

QUANT_KEY = "quant"


def run_parser(prog: str, description: str, config_help: str):
    """The jsonargparse parser of a training command (qat distill, qat finetune): --config, --resume, --overwrite;
    the caller adds its recipe's keys."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=prog, exit_on_error=False, description=description)
    p.add_argument("--config", action=ActionConfigFile, help=config_help)
    p.add_argument("--resume", type=str | None, default=None,
                   help="'last' (the run directory's last checkpoint) or a checkpoint path")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing output / run directory")
    return p


def add_quant_arguments(parser) -> None:
    """Add --quant.<group>.<field> for every QuantSpec field. Defaults are suppressed in the parsed result (and
    written into the help instead): a key the user did not give stays absent, so `quant` is absent when no key is
    given (a recipe may take its spec from --student) and the dataclass defaults fill in what is missing
    (WeightSpec.bits = the chosen format's default, not the default format's)."""
    parser.add_class_arguments(QuantSpec, nested_key=QUANT_KEY, fail_untyped=False)
    for action in parser._actions:
        if action.dest.startswith(QUANT_KEY + ".") and action.default is not argparse.SUPPRESS:
            if action.default is not None and action.help:
                action.help = f"{action.help} (default: {action.default})"
            action.default = argparse.SUPPRESS


def argument_error(e: Exception, what: str, error: type[Exception] = QuantConfigError) -> Exception:
    """A jsonargparse error as one line (the CLI prints the first line only)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return error(f"{what}: " + " ".join(lines[:4]))


def parse_value(s: str) -> Any:
    """A command-line value: int, float ('3e-3' too, which YAML 1.1 reads as a string), else YAML."""
    import yaml

    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return yaml.safe_load(s)
