"""Command line for training and evaluation.

    python -m backend.train diffusion [--config JSON|FILE] [--set KEY=VALUE ...] [flags]
    python -m backend.train recon     [--config JSON|FILE] [--set KEY=VALUE ...] [flags]
    torchrun --nproc_per_node=N -m backend.train diffusion ...
    python -m backend.train eval diffusion|recon --weights DIR [--output-dir DIR] [...]
    python -m backend.train eval all --diffusion-weights DIR --recon-weights DIR [...]
    python -m backend.train ablation attention|recon [--config ...] [--steps N] [...]
    python -m backend.train export --weights DIR --output DIR [--dtype float16]

`--config` takes a JSON object (inline or a file) with any fields of the trainer config;
nested configs (data, pool, loss) are merged field by field. `--set` sets one dotted
field, its value parsed as JSON when it parses (`--set data.height=32`,
`--set model_overrides.patch_size=4`). Named flags win over both.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from backend.train.evaluate import EvalConfig, evaluate_all, run_evaluation

TRAIN_FLAGS = {"steps": int, "batch_size": int, "lr": float, "output_dir": str,
               "device": str, "resume": str, "max_minutes": float, "seed": int,
               "num_workers": int, "preset": str}
EVAL_FLAGS = {"output_dir": str, "num_samples": int, "sampler_steps": int, "device": str,
              "attention_impl": str, "batch_size": int, "seed": int, "guidance": float}


def parse_value(text: str) -> Any:
    """JSON when it parses ("32", "[32, 32]", "true"), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_json_argument(text: str) -> dict[str, Any]:
    """An inline JSON object or the path of a file holding one."""
    source = Path(text).read_text() if not text.lstrip().startswith("{") else text
    try:
        values = json.loads(source)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config: not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError("--config: expected a JSON object")
    return values


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys ("data.height", "lr") in a nested config dict; returns a new dict.

    Keys under a field named `*overrides` may be new; every other key must exist."""
    result = copy.deepcopy(values)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ValueError(f"config override {dotted!r}: {key!r} is not a nested config")
            node = node[key]
        if leaf not in node and not (parents and parents[-1].endswith("overrides")):
            raise ValueError(f"config override {dotted!r}: unknown key {leaf!r}")
        node[leaf] = value
    return result


def build_config(cls: type, config_json: str | None, sets: list[str],
                 flags: dict[str, Any]) -> Any:
    """Defaults of `cls`, then --config (nested configs merged), then --set, then flags."""
    values = cls().to_dict() if hasattr(cls, "to_dict") else dataclasses.asdict(cls())
    if config_json:
        nested = {f.name for f in dataclasses.fields(cls)
                  if isinstance(values.get(f.name), dict) and not f.name.endswith(
                      ("overrides", "weights"))}
        for key, value in read_json_argument(config_json).items():
            if key in nested and isinstance(value, dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
    dotted = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        dotted[key.strip()] = parse_value(text)
    values = apply_overrides(values, dotted)
    values.update({k: v for k, v in flags.items() if v is not None})
    if hasattr(cls, "from_dict"):
        return cls.from_dict(values)
    from backend.weights import config_from_dict

    return config_from_dict(cls, values)


def _add_flags(parser: argparse.ArgumentParser, flags: dict[str, type]) -> None:
    parser.add_argument("--config", help="JSON object, inline or in a file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set one (dotted) config field; repeatable")
    for name, kind in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend.train",
                                     description="Train or evaluate the 4D models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("diffusion", "recon"):
        sub = commands.add_parser(name, help=f"train the {name} model")
        _add_flags(sub, TRAIN_FLAGS)
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved config as JSON and exit")
    evaluate = commands.add_parser("eval", help="evaluate trained weights")
    evaluate.add_argument("model", choices=("diffusion", "recon", "all"))
    evaluate.add_argument("--weights", help="save_pretrained folder (diffusion or recon)")
    evaluate.add_argument("--diffusion-weights", help="with 'all': the diffusion weights")
    evaluate.add_argument("--recon-weights", help="with 'all': the recon weights")
    _add_flags(evaluate, EVAL_FLAGS)
    export = commands.add_parser("export", help="copy trained weights, e.g. in half precision "
                                 "to ship them")
    export.add_argument("--weights", required=True, help="save_pretrained folder")
    export.add_argument("--output", required=True, help="folder to write")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        default="float16")
    ablation = commands.add_parser("ablation", help="train and evaluate the paper's ablation "
                                   "variants with one budget")
    ablation.add_argument("name", choices=("attention", "recon"))
    ablation.add_argument("--eval-config", help="JSON object for the evaluation (EvalConfig)")
    _add_flags(ablation, TRAIN_FLAGS)
    return parser


def export_command(args: argparse.Namespace) -> int:
    import torch

    from backend.models import model_class_of
    from backend.weights import load_pretrained, save_pretrained

    model_cls, config_cls = model_class_of(args.weights)
    model, config = load_pretrained(args.weights, model_cls, config_cls)
    folder = save_pretrained(args.output, model, config, dtype=getattr(torch, args.dtype))
    size = (folder / "model.safetensors").stat().st_size / 1e6
    print(f"export: {model_cls.__name__} -> {folder} ({args.dtype}, {size:.1f} MB)")
    return 0


def ablation_command(args: argparse.Namespace) -> int:
    from backend.train.ablation import markdown_table, run_ablation

    flags = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    output_dir = flags.pop("output_dir", None) or f"out/ablation/{args.name}"
    eval_config = build_config(EvalConfig, args.eval_config, [], {})
    table = run_ablation(args.name, args.config, args.set, flags, output_dir, eval_config)
    print(markdown_table(table["rows"]))
    return 0


def train_command(args: argparse.Namespace) -> int:
    from backend.train.common import teardown_distributed

    if args.command == "diffusion":
        from backend.train.diffusion import DiffusionTrainConfig as config_cls
        from backend.train.diffusion import train_diffusion as train
    else:
        from backend.train.recon import ReconTrainConfig as config_cls
        from backend.train.recon import train_recon as train
    flags = {name: getattr(args, name) for name in TRAIN_FLAGS}
    config = build_config(config_cls, args.config, args.set, flags)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        final = train(config)
    finally:
        teardown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.command}: final weights in {final}", file=sys.stderr)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in EVAL_FLAGS}
    config = build_config(EvalConfig, args.config, args.set, flags)
    if args.model == "all":
        if not (args.diffusion_weights and args.recon_weights):
            raise ValueError("eval all: needs --diffusion-weights and --recon-weights")
        report = evaluate_all(args.diffusion_weights, args.recon_weights, config)
    else:
        if not args.weights:
            raise ValueError(f"eval {args.model}: needs --weights DIR")
        report = run_evaluation(args.model, args.weights, config)
    headline = {k: v for k, v in report.items() if isinstance(v, float)}
    print(json.dumps(headline, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "ablation":
            return ablation_command(args)
        if args.command == "export":
            return export_command(args)
        return eval_command(args) if args.command == "eval" else train_command(args)
    except ValueError as error:
        print(f"backend.train: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
