"""Recipes from YAML files and command lines: one jsonargparse parser for both, generated from the schema in
qat/distill/recipe.py (the quant keys from qat/args.py, shared with `qat ptq`), plus per-stage overrides
(`--stages.<i>.<key> VALUE`, which jsonargparse has no syntax for)."""
import copy
import json
import os
import re
from typing import Any

from qat.args import add_quant_arguments, argument_error, parse_value, run_parser
from qat.config import from_dict
from qat.distill.recipe import Recipe, RecipeError

_INDEX_OVERRIDE = re.compile(r"^--stages\.(\d+)\.([A-Za-z0-9_.]+)(?:=(.*))?$", re.DOTALL)


def build_parser(prog: str = "qat distill"):
    """The `qat distill` argument parser: --config, --resume, --overwrite, plus one option per Recipe field
    (generated from the dataclass signatures by jsonargparse: --model, --ptq.method, --data.train_file, ...)."""
    p = run_parser(prog, (
        "Staged quantization-aware distillation (block-wise -> end-to-end -> activations) of a student against its "
        "FP teacher. Stage keys: --stages.<i>.<key> VALUE overrides one key of stage i (e.g. --stages.0.steps 50); "
        "--stages.<key> VALUE overrides the last stage."), "recipe YAML (configs/<model>/<method>.yaml)")
    p.add_class_arguments(Recipe, nested_key=None, fail_untyped=False, skip={"quant"})
    add_quant_arguments(p)
    return p


def _split_index_overrides(argv: list[str]) -> tuple[list[str], list[tuple[int, str, str]]]:
    """Pull `--stages.<i>.<key> VALUE` (or `=VALUE`) out of argv: jsonargparse has no per-index list syntax."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        m = _INDEX_OVERRIDE.match(argv[i])
        if not m:
            rest.append(argv[i])
            i += 1
            continue
        if m.group(3) is not None:
            value, i = m.group(3), i + 1
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            raise RecipeError(f"{argv[i]} needs a value")
        overrides.append((int(m.group(1)), m.group(2), value))
    return rest, overrides


def _apply_index_override(stages: list, idx: int, key: str, value: str) -> None:
    if not 0 <= idx < len(stages):
        raise RecipeError(f"--stages.{idx}.{key}: the recipe has {len(stages)} stage(s)")
    node = stages[idx]
    *parents, leaf = key.split(".")
    for k in parents:
        if not isinstance(node, dict) or k not in node or not isinstance(node[k], dict):
            raise RecipeError(f"--stages.{idx}.{key}: stages have no key {k!r}")
        node = node[k]
    if leaf not in node and not (parents and parents[-1] == "lr"):
        raise RecipeError(f"--stages.{idx}.{key}: unknown stage key {leaf!r}")
    node[leaf] = parse_value(value)


def parse_args(argv: list[str], prog: str = "qat distill") -> tuple[Recipe, dict[str, Any]]:
    """(validated Recipe, {'resume', 'overwrite'}) from a command line."""
    from jsonargparse import ArgumentError

    parser = build_parser(prog)
    rest, index_overrides = _split_index_overrides(list(argv))
    # --print_config is answered here, after the per-stage overrides jsonargparse does not see (its own action would
    # print the recipe without them)
    show = [a for a in rest if a == "--print_config" or a.startswith("--print_config=")]
    rest = [a for a in rest if a not in show]
    try:
        ns = parser.parse_args(rest)
    except ArgumentError as e:
        raise argument_error(e, "recipe", RecipeError) from None
    d = ns.as_dict()
    d.pop("config", None)
    extra = {"resume": d.pop("resume", None), "overwrite": bool(d.pop("overwrite", False))}
    if index_overrides:
        for idx, key, value in index_overrides:
            _apply_index_override(d["stages"], idx, key, value)
        try:  # type-check the edited recipe again (parse_object turns nested dicts into Namespaces: give it a copy)
            d = parser.parse_object(copy.deepcopy({**d, **extra})).as_dict()
        except ArgumentError as e:
            raise argument_error(e, "recipe", RecipeError) from None
    for k in ("config", "resume", "overwrite"):
        d.pop(k, None)
    recipe = recipe_from_dict(d)
    if show:
        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict(), default=str)), sort_keys=False), end="")
        raise SystemExit(0)
    return recipe, extra


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Recipe from a plain dict (as parsed); unknown keys raise RecipeError."""
    if not isinstance(d.get("stages") or [], list):
        raise RecipeError("stages: expected a list of stages")
    return from_dict(Recipe, d, "recipe", RecipeError).validate()


def load_recipe(path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file (plus optional command-line style overrides) -> validated Recipe."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    recipe, _ = parse_args(["--config", str(path), *(overrides or [])])
    return recipe
