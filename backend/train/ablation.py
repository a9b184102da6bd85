"""The paper's ablations at small scale, each variant trained with the same budget.

    python -m backend.train ablation attention [--config JSON] [--set K=V ...] [--steps N]
    python -m backend.train ablation recon     [--config JSON] [--set K=V ...] [--steps N]

attention: the diffusion model with fused view-time attention against the two designs the
paper rejects, `sequential` (a view-attention layer then a time-attention layer) and
`parallel` (both from the same input, outputs summed) - paper Table 2.
recon: the reconstruction model against itself without the temporal attention layers and
without camera token replacement.
recipe: diffusion recipes at equal compute (give every variant the same `max_cpu_minutes`
and a `steps` it cannot reach, one thread each: CPU time, unlike wall time, stays a fair
budget when other work shares the machine): today's DiT (patch 8) against patch 4, a
convolutional hourglass around the transformer, 3D-cache conditioning (the given frames
unprojected with depth and rendered into every cell) and a loss that weights the pixels
that change after the first timestep; `baseline_seed1` repeats the baseline with another
seed, to show how far two runs of one recipe differ. All keep the fused view-time attention.

Every variant gets the same config (steps, batch, data, seed) but for the one switch, is
evaluated on the same held-out samples, and the table (ablation.json, ablation.md) lists
the held-out figures with the training time and final loss of each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from backend.train.config_cli import build_config
from backend.train.evaluate import EvalConfig, run_evaluation

ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "attention": [("fused", {"model_overrides.attention": "fused"}),
                  ("sequential", {"model_overrides.attention": "sequential"}),
                  ("parallel", {"model_overrides.attention": "parallel"})],
    "recipe": [("baseline", {}),
               ("patch4", {"model_overrides.patch_size": 4}),
               ("hourglass", {"model_overrides.conv_channels": 32}),
               ("cache3d", {"model_overrides.cache_conditioning": True}),
               ("changed_pixels", {"changed_pixel_weight": 3.0}),
               ("baseline_seed1", {"seed": 1})],
    "recon": [("full", {}),
              ("no_temporal_layers", {"model_overrides.use_temporal_attention": False}),
              ("no_camera_token_replacement",
               {"model_overrides.camera_token_replacement": False})],
}
COLUMNS = {
    "attention": ("psnr_generated", "psnr_copy_baseline", "ssim_generated",
                  "psnr_generated_row_only", "psnr_copy_baseline_row_only"),
    "recon": ("psnr_recon", "ssim_recon"),
}
COLUMNS["recipe"] = COLUMNS["attention"]
FAMILY_COLUMNS = ("psnr_generated", "psnr_copy_baseline", "psnr_generated_row_only",
                  "psnr_copy_baseline_row_only")


def _final_loss(output_dir: Path) -> float | None:
    losses = []
    log = output_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses.append(record["loss"])
    return round(sum(losses[-5:]) / len(losses[-5:]), 5) if losses else None


def _steps_done(output_dir: Path, planned: int) -> int:
    """The last step the run logged (a time budget can end it before `planned`)."""
    log = output_dir / "log.jsonl"
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines()
             if "loss" in line] if log.is_file() else []
    return max(steps, default=planned)


def run_ablation(name: str, base_json: str | None, sets: list[str], flags: dict[str, Any],
                 output_dir: str | Path, eval_config: EvalConfig,
                 variants: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate the variants of ablation `name` (all, or those in `variants`);
    each variant's row is kept in `<output_dir>/<variant>/row.json`, and the table lists
    every variant of the ablation that has a row, so variants can run as separate processes
    side by side. Returns the table as a dict."""
    if name not in ABLATIONS:
        raise ValueError(f"ablation: expected one of {sorted(ABLATIONS)}, got {name!r}")
    known = [variant for variant, _ in ABLATIONS[name]]
    unknown = sorted(set(variants or ()) - set(known))
    if unknown:
        raise ValueError(f"ablation {name}: unknown variants {unknown}; choose from {known}")
    if name in ("attention", "recipe"):
        from backend.train.diffusion import DiffusionTrainConfig as config_cls
        from backend.train.diffusion import train_diffusion as train
        kind = "diffusion"
    else:
        from backend.train.recon import ReconTrainConfig as config_cls
        from backend.train.recon import train_recon as train
        kind = "recon"
    out = Path(output_dir)
    for variant, switch in ABLATIONS[name]:
        if variants and variant not in variants:
            continue
        folder = out / variant
        variant_sets = [*sets, *(f"{k}={json.dumps(v)}" for k, v in switch.items())]
        config = build_config(config_cls, base_json, variant_sets,
                              {**flags, "output_dir": str(folder / "train")})
        started, started_cpu = time.perf_counter(), time.process_time()
        final = train(config)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        eval_out = EvalConfig(**{**eval_config.__dict__, "output_dir": str(folder / "eval")})
        report = run_evaluation(kind, final, eval_out)
        row = {"variant": variant, "train_s": round(seconds, 1),
               "train_cpu_s": round(cpu_seconds, 1),
               "steps": _steps_done(folder / "train", config.steps),
               "final_loss": _final_loss(folder / "train")}
        row.update({key: round(report[key], 3) for key in COLUMNS[name] if key in report})
        for family, figures in report.get("families", {}).items():
            row.update({f"{family}_{key}": round(figures[key], 3) for key in FAMILY_COLUMNS
                        if key in figures})
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "row.json").write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    rows = [json.loads((out / variant / "row.json").read_text()) for variant in known
            if (out / variant / "row.json").is_file()]
    table = {"ablation": name, "rows": rows, "sets": sets, "flags": flags}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(table, indent=2) + "\n")
    if rows:
        (out / "ablation.md").write_text(markdown_table(rows) + "\n")
    return table


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
