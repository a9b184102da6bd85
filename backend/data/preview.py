"""A contact sheet of generated samples, a few per scene family, to look at the data.

One row per sample: its views at the first timestep, view 0 at the last timestep, then view
0's depth (near bright, far dark, nothing hit black) and alpha. Dome rows come first.

    python -m backend.data.preview --out out/data_preview.png [--count 4 --size 64]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from backend.data.config import DataConfig
from backend.data.generator import make_sample
from backend.data.sample import Sample

GAP = 2  # pixels between tiles


def depth_image(depth: np.ndarray) -> np.ndarray:  # [H, W] -> [H, W, 3] in [0, 1]
    """Inverse depth scaled to the image's range; black where nothing was hit."""
    hit = depth > 0
    if not hit.any():
        return np.zeros((*depth.shape, 3))
    inverse = np.where(hit, 1.0 / np.maximum(depth, 1e-6), 0.0)
    low, high = inverse[hit].min(), inverse[hit].max()
    scaled = np.where(hit, 0.15 + 0.85 * (inverse - low) / max(high - low, 1e-9), 0.0)
    return np.repeat(scaled[..., None], 3, axis=-1)


def sample_row(sample: Sample) -> list[np.ndarray]:
    """The tiles [H, W, 3] of one sample's row."""
    frames = sample.frames.permute(0, 1, 3, 4, 2).numpy()  # [V, T, H, W, 3]
    tiles = [frames[v, 0] for v in range(sample.num_views)] + [frames[0, -1]]
    tiles.append(depth_image(sample.depth[0, 0, 0].numpy()))
    tiles.append(np.repeat(sample.alpha[0, 0, 0].numpy()[..., None], 3, axis=-1))
    return tiles


def contact_sheet(rows: list[list[np.ndarray]]) -> np.ndarray:  # -> [H', W', 3] uint8
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    sheet = np.ones((len(rows) * (height + GAP) + GAP, columns * (width + GAP) + GAP, 3))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = GAP + r * (height + GAP), GAP + c * (width + GAP)
            sheet[top:top + height, left:left + width] = tile
    return (np.clip(sheet, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def preview(out: str | Path, count: int = 4, size: int = 64, views: int = 4, steps: int = 4,
            seed: int = 0, width: int | None = None,
            families: tuple[str, ...] = ("dome", "open")) -> Path:
    """Write a contact sheet of `count` samples of each family."""
    import imageio.v3 as iio

    base = DataConfig(num_views=views, num_steps=steps, height=size, width=width or size,
                      seed=seed, reverse_views_probability=0.0, homography_fraction=0.0)
    rows = []
    for family in families:
        config = replace(base, scene_kind=family)
        rows += [sample_row(make_sample(config, i, kind="dynamic")) for i in range(count)]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, contact_sheet(rows))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/data_preview.png")
    parser.add_argument("--count", type=int, default=4, help="samples per family")
    parser.add_argument("--size", type=int, default=64, help="image height in pixels")
    parser.add_argument("--width", type=int, default=None, help="image width (default: size)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="dome,open", help="comma-separated families")
    args = parser.parse_args(argv)
    path = preview(args.out, args.count, args.size, args.views, args.steps, args.seed,
                   args.width, tuple(args.families.split(",")))
    print(path)


if __name__ == "__main__":
    main()
