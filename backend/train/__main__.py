"""Command line for training and evaluation.

    python -m backend.train diffusion [--config JSON|FILE] [--set KEY=VALUE ...] [flags]
    python -m backend.train recon     [--config JSON|FILE] [--set KEY=VALUE ...] [flags]
    torchrun --nproc_per_node=N -m backend.train diffusion ...
    python -m backend.train eval diffusion|recon --weights DIR [--output-dir DIR] [...]
    python -m backend.train eval all --diffusion-weights DIR --recon-weights DIR [...]
    python -m backend.train ablation attention|recipe|recon [--variants a,b] [--config ...]
    python -m backend.train export --weights DIR --output DIR [--dtype float16]

`--config` takes a JSON object (inline or a file) with any fields of the trainer config;
nested configs (data, pool, loss) are merged field by field. `--set` sets one dotted
field, its value parsed as JSON when it parses (`--set data.height=32`,
`--set model_overrides.patch_size=4`). Named flags win over both. `eval` scores each scene
family of `families` (the procedural "dome" held-out set and the "open" one; for one of
them: `--set 'families=["open"]'`) and prints the headline figures of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from backend.train.config_cli import build_config
from backend.train.evaluate import EvalConfig, evaluate_all, run_evaluation

TRAIN_FLAGS = {"steps": int, "batch_size": int, "lr": float, "output_dir": str,
               "device": str, "resume": str, "max_minutes": float,
               "max_cpu_minutes": float, "seed": int,
               "num_workers": int, "preset": str}
EVAL_FLAGS = {"output_dir": str, "num_samples": int, "sampler_steps": int, "device": str,
              "attention_impl": str, "batch_size": int, "seed": int, "guidance": float}


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
    ablation.add_argument("name", choices=("attention", "recipe", "recon"))
    ablation.add_argument("--variants", help="comma-separated variants to run (default: all); "
                          "rows of variants run earlier into the same folder stay in the table")
    ablation.add_argument("--eval-config", help="JSON object for the evaluation (EvalConfig)")
    _add_flags(ablation, TRAIN_FLAGS)
    return parser


def export_command(args: argparse.Namespace) -> int:
    import torch

    from backend import models as registry

    model = registry.load_model(args.weights)
    folder = model.save_pretrained(args.output, dtype=getattr(torch, args.dtype))
    size = (folder / "model.safetensors").stat().st_size / 1e6
    print(f"export: {type(model).__name__} -> {folder} ({args.dtype}, {size:.1f} MB)")
    return 0


def ablation_command(args: argparse.Namespace) -> int:
    from backend.train.ablation import markdown_table, run_ablation

    flags = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    output_dir = flags.pop("output_dir", None) or f"out/ablation/{args.name}"
    eval_config = build_config(EvalConfig, args.eval_config, [], {})
    variants = args.variants.split(",") if args.variants else None
    table = run_ablation(args.name, args.config, args.set, flags, output_dir, eval_config,
                         variants)
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
    families = {family: {k: v for k, v in figures.items() if isinstance(v, float)}
                for family, figures in report["families"].items()}
    print(json.dumps({"families": families}, indent=2))
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
