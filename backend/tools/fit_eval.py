"""Quality of the fitting stage on open Blender scenes (`backend.tools.scenes`): PSNR / SSIM
of the fitted Gaussians at the rig's own views and at held-out cameras, against two trivial
baselines scored the same way (an image of the frames' mean colour; the nearest rig
camera's frame copied). With --check-2x a second fit at half the scenes' resolution is
rendered at twice its fitting resolution (at the rig's and the held-out views) and scored
against the scenes' frames, beside bilinear upsampling of its render at the fitting
resolution (no speckle: not worse).

    python -m backend.tools.fit_eval [--scenes out/scenes] [--count 3] [--preset default]
                                     [--out out/fit_eval] [--seconds 0] [--check-2x]

The fit runs as the reconstruct job runs it (rig normalised, every rig cell at weight 1);
writes report.json and a comparison grid per scene (held-out: truth | ours | nearest view).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend import pipeline
from backend.cameras import c2w_to_viewmat, intrinsics_to_K
from backend.fit.environment import Environment
from backend.gaussians import Gaussians
from backend.recon.losses import ssim
from backend.render import rasterize_gaussians

ROOT = Path(__file__).resolve().parents[2]


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = float((x - y).square().mean())
    return 120.0 if mse <= 1e-12 else -10.0 * float(np.log10(mse))


def to_tensor(frames: np.ndarray) -> torch.Tensor:  # [..., H, W, 3] uint8 -> [..., 3, H, W]
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).movedim(-1, -3)


def render(g: Gaussians, c2w: np.ndarray, intr: np.ndarray, background: Environment,
           mode: str) -> torch.Tensor:  # [C, 3, H, W]
    """The Gaussians over the fit's environment (what rays that miss them see), in the
    rasterize mode they were fitted in."""
    with torch.no_grad():
        out = rasterize_gaussians(g, c2w, intr, rasterize_mode=mode)
        _C, H, W = out.rgb.shape[:3]
        behind = background.image(c2w_to_viewmat(torch.as_tensor(c2w, dtype=torch.float32)),
                                  intrinsics_to_K(torch.as_tensor(intr, dtype=torch.float32)),
                                  W, H)
        rgb = out.rgb + (1 - out.alpha) * behind
    return rgb.permute(0, 3, 1, 2).clamp(0, 1)


def nearest_views(rig_c2w: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Per camera of `c2w` [C, 4, 4], the rig view [V, 4, 4] that sees most alike: nearest
    position, ties broken by viewing direction."""
    position = np.linalg.norm(c2w[:, None, :3, 3] - rig_c2w[None, :, :3, 3], axis=-1)
    facing = 1 - np.einsum("ck,vk->cv", c2w[:, :3, 2], rig_c2w[:, :3, 2])
    scale = np.linalg.norm(rig_c2w[:, :3, 3], axis=-1).mean()
    return np.argmin(position / scale + facing, axis=1)


def score(rendered: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return {"psnr": round(psnr(rendered, truth), 3),
            "ssim": round(float(ssim(rendered, truth).mean()), 4)}


def fit_scene(scene: dict, preset: str, seconds: float, resolution: int, seed: int = 0,
              init: str = "stereo") -> tuple[list[Gaussians], Environment, dict, float]:
    """The reconstruct job's fit of a scene's rig frames: Gaussians per timestep in the
    world, the learned environment, the fit's summary and its time in seconds (the
    feed-forward prior's included, with `init` "stereo+recon")."""
    frames, c2w, intr = scene["frames"], scene["c2w"], scene["intrinsics"]
    V, T = frames.shape[:2]
    frame = pipeline.rig_frame(c2w)
    settings = pipeline.GenerateSettings(fit=preset, fit_seconds=seconds, seed=seed,
                                         fit_resolution=resolution, fit_init=init)
    started = time.perf_counter()
    prior = None
    if settings.fit_prior:  # as the reconstruct job: the shipped model on the frames
        from backend import models as registry

        _, folder = registry.find_model("reconstruction", None)
        recon = registry.load_model(folder, "cpu", role="reconstruction")
        grid, grid_intr = pipeline.model_frames(frames, intr, tuple(recon.config.image_size))
        prior = pipeline.reconstruct_grid(recon, grid, frame.to_normalised(c2w), grid_intr,
                                          settings)
    seq, summary = pipeline.fit_cells([pipeline.FitCells(frames, np.ones((V, T), np.float32))],
                                      frame.to_normalised(c2w), intr, settings, prior=prior)
    seconds_taken = time.perf_counter() - started
    background = (Environment.from_list(summary["environment"]) if summary["environment"]
                  else Environment.constant(torch.tensor(summary["background"]), 0))
    return [frame.to_world(g) for g in seq], background, summary, seconds_taken


def check_double_resolution(scene: dict, preset: str, seconds: float, init: str = "stereo"
                            ) -> dict:
    """Fit at half the frames' size; render the rig's views and the held-out views at twice
    that (the frames' size) and score against their frames, beside the half-size render
    upsampled bilinearly. At the rig's views the fit knows the content, so speckle is what
    makes the 2x render lose; at held-out views a sharp guess can lose to a blurred one."""
    size = max(scene["frames"].shape[2:4])
    world, background, summary, _ = fit_scene(scene, preset, seconds, size // 2, init=init)
    mode = summary["rasterize_mode"]
    rows: dict[str, list] = {k: [] for k in ("input_2x", "input_upsampled_2x",
                                             "held_out_2x", "upsampled_2x")}
    for prefix, names in (("", ("input_2x", "input_upsampled_2x")),
                          ("held_out_", ("held_out_2x", "upsampled_2x"))):
        frames, all_c2w = scene[prefix + "frames"], scene[prefix + "c2w"]
        intr = np.array(scene[prefix + "intrinsics"], np.float64)
        half = intr.copy()
        half[..., :6] /= 2
        for t in range(frames.shape[1]):
            truth = to_tensor(frames[:, t])
            double = render(world[t], all_c2w[:, t], intr[:, t], background, mode)
            small = render(world[t], all_c2w[:, t], half[:, t], background, mode)
            up = F.interpolate(small, size=truth.shape[-2:], mode="bilinear",
                               align_corners=False)
            rows[names[0]].append(score(double, truth))
            rows[names[1]].append(score(up, truth))
    return {name: {k: round(float(np.mean([r[k] for r in values])), 3)
                   for k in ("psnr", "ssim")} for name, values in rows.items()}


def evaluate_scene(scene: dict, preset: str, seconds: float, seed: int = 0,
                   init: str = "stereo") -> tuple[dict, dict[str, torch.Tensor]]:
    """Fit one scene's rig frames; score every timestep at the rig and held-out views."""
    frames, c2w, intr = scene["frames"], scene["c2w"], scene["intrinsics"]
    V, T = frames.shape[:2]
    world, background, summary, fit_seconds = fit_scene(scene, preset, seconds,
                                                        max(frames.shape[2:4]), seed, init)
    mode = summary["rasterize_mode"]
    rows: dict[str, list] = {k: [] for k in ("input", "held_out", "mean_colour", "nearest")}
    pictures: dict[str, list[torch.Tensor]] = {"truth": [], "ours": [], "nearest": []}
    held_frames, held_c2w, held_intr = (scene["held_out_frames"], scene["held_out_c2w"],
                                        scene["held_out_intrinsics"])
    for t in range(T):
        truth_in = to_tensor(frames[:, t])
        rows["input"].append(score(render(world[t], c2w[:, t], intr[:, t], background, mode),
                                   truth_in))
        truth = to_tensor(held_frames[:, t])
        ours = render(world[t], held_c2w[:, t], held_intr[:, t], background, mode)
        rows["held_out"].append(score(ours, truth))
        mean = truth_in.mean(dim=(0, 2, 3), keepdim=True).expand_as(truth)
        rows["mean_colour"].append(score(mean, truth))
        nearest = truth_in[nearest_views(c2w[:, t], held_c2w[:, t])]
        if nearest.shape != truth.shape:
            nearest = F.interpolate(nearest, size=truth.shape[-2:], mode="bilinear",
                                    antialias=True, align_corners=False)
        rows["nearest"].append(score(nearest, truth))
        pictures["truth"].append(truth)
        pictures["ours"].append(ours)
        pictures["nearest"].append(nearest)
    report = {name: {k: round(float(np.mean([r[k] for r in values])), 3)
                     for k in ("psnr", "ssim")} for name, values in rows.items()}
    best_baseline = max(report["mean_colour"]["psnr"], report["nearest"]["psnr"])
    report.update({"held_out_over_best_baseline_db": round(report["held_out"]["psnr"]
                                                           - best_baseline, 3),
                   "fit_seconds": round(fit_seconds, 1), "fit": summary,
                   "views": V, "timesteps": T, "held_out_views": held_frames.shape[0],
                   "size": list(frames.shape[2:4])})
    return report, {k: torch.stack(v, dim=1) for k, v in pictures.items()}


def comparison_grid(pictures: dict[str, torch.Tensor], path: Path, timesteps=(0, -1)) -> None:
    """Rows: held-out views at the first and last timestep; columns: truth | ours | nearest."""
    import imageio.v3 as iio

    rows = []
    for t in timesteps:
        for c in range(pictures["truth"].shape[0]):
            rows.append(torch.cat([pictures[k][c, t] for k in ("truth", "ours", "nearest")],
                                  dim=-1))
    image = torch.cat(rows, dim=-2)
    iio.imwrite(path, (image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy())


def main(argv: list[str] | None = None) -> int:
    from backend.tools.scenes import load_scene

    parser = argparse.ArgumentParser(prog="python -m backend.tools.fit_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=Path, default=ROOT / "out" / "scenes")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fit_eval")
    parser.add_argument("--init", default="stereo", choices=("stereo", "stereo+recon"),
                        help="the fit's initialisation (the jobs' fit_init)")
    parser.add_argument("--check-2x", action="store_true",
                        help="also fit at half size and render at twice that")
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.scenes.iterdir() if p.is_dir())[:args.count]
    if not folders:
        raise SystemExit(f"no scenes in {args.scenes}: render them with "
                         "`python -m backend.tools.scenes --out out/scenes --count 3`")
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for folder in folders:
        scene = load_scene(folder)
        report, pictures = evaluate_scene(scene, args.preset, args.seconds, init=args.init)
        if args.check_2x:
            report.update(check_double_resolution(scene, args.preset, args.seconds, args.init))
        comparison_grid(pictures, args.out / f"{folder.name}.png")
        reports[folder.name] = report
        print(f"{folder.name}: input {report['input']['psnr']:.2f} dB, held-out "
              f"{report['held_out']['psnr']:.2f} dB (mean colour "
              f"{report['mean_colour']['psnr']:.2f}, nearest view "
              f"{report['nearest']['psnr']:.2f}), fit {report['fit_seconds']:.0f} s",
              flush=True)
    keys = [k for k in ("input", "held_out", "mean_colour", "nearest", "input_2x",
                        "input_upsampled_2x", "held_out_2x", "upsampled_2x")
            if k in next(iter(reports.values()))]
    summary = {k: {m: round(float(np.mean([r[k][m] for r in reports.values()])), 3)
                   for m in ("psnr", "ssim")} for k in keys}
    summary["held_out_over_best_baseline_db"] = round(float(np.mean(
        [r["held_out_over_best_baseline_db"] for r in reports.values()])), 3)
    summary["fit_seconds"] = round(float(np.mean([r["fit_seconds"]
                                                  for r in reports.values()])), 1)
    out = {"preset": args.preset, "init": args.init, "scenes": reports, "mean": summary}
    (args.out / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
