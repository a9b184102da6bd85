"""The fitting stage: persistent 4D Gaussians optimised against the user's own frames.

    plane-sweep initialisation at the most observed timestep
      -> phase "fit": all parameters, adaptive density control (clone / split / prune)
      -> phase "track": each later (and earlier) timestep warm-started from its neighbour,
         positions and rotations only, held together by rigidity, rotation-similarity and
         isometry losses over nearest neighbours
      -> phase "polish": every parameter on cells of every timestep (shared appearance sees
         all views of all timesteps)

Cameras come normalised (the pipeline moves the rig's centre to the origin), so lengths
scale with the mean camera distance. Deterministic for a seed on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backend.cameras import scale_intrinsics
from backend.fit.config import FitConfig
from backend.fit.density import GradientStats, densify_and_prune, reset_opacity
from backend.fit.environment import Environment
from backend.fit.init import (
    INIT_MAX_SIZE,
    InitPoints,
    plane_sweep_init,
    prior_points,
    top_rows,
)
from backend.fit.losses import (
    nearest_neighbours,
    neighbour_weights,
    photometric,
    rigidity_losses,
)
from backend.fit.state import FitGaussians, quat_to_matrix
from backend.fit.targets import FitTarget, timestep_weight
from backend.gaussians import Gaussians
from backend.render import rasterize

Progress = Callable[[str, int, int, str], None]  # (stage, step, of, message)
PHASE_END = {"fit": 0.55, "track": 0.85, "polish": 1.0}  # fractions of max_seconds


class FitCancelled(Exception):
    """The caller asked to stop."""


@dataclass
class FitReport:
    seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    count: int = 0
    initial_count: int = 0
    prior_count: int = 0  # of the initial Gaussians, those from the feed-forward prior
    losses: dict[str, float] = field(default_factory=dict)
    density: list[dict[str, int]] = field(default_factory=list)
    environment: list[list[float]] | None = None  # learned background SH coefficients


class _Fitter:
    def __init__(self, targets: list[FitTarget], config: FitConfig, device: torch.device,
                 background: Tensor | None, progress: Progress | None,
                 should_cancel: Callable[[], bool] | None):
        self.targets = [t.to(device) for t in targets]
        self.config, self.device = config, device
        self.generator = torch.Generator().manual_seed(config.seed)
        self.progress, self.should_cancel = progress, should_cancel
        self.num_steps = targets[0].weights.shape[1]
        centres = torch.cat([t.c2w[..., :3, 3].reshape(-1, 3) for t in targets])
        self.extent = float(centres.norm(dim=-1).mean().clamp(min=1e-6))
        self.learn_background = background is None
        start = background if background is not None else self._border_colour()
        degree = config.environment_degree if self.learn_background else 0
        self.environment = Environment.constant(start.to(device), degree)
        self.environment.coeffs.requires_grad_(self.learn_background)
        self.report = FitReport()
        self.started = time.perf_counter()
        self.plane: tuple[Tensor, Tensor] | None = None  # the ground, when init found one

    # ---------------------------------------------------------------------- helpers
    def _border_colour(self) -> Tensor:
        """The median colour of the frames' top rows: the sky or backdrop, usually."""
        pixels = torch.cat([top_rows(t.images[t.weights > 0]) for t in self.targets])
        return pixels.median(dim=0).values

    def _check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise FitCancelled

    def _tell(self, stage: str, step: int, of: int, message: str) -> None:
        if self.progress is not None:
            self.progress(stage, step, of, message)

    def _cells(self, t: int) -> list[tuple[int, int]]:
        return [(i, v) for i, target in enumerate(self.targets) for v in target.cells(t)]

    def _pick(self, cells: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(cells) <= self.config.views_per_step:
            return cells
        order = torch.randperm(len(cells), generator=self.generator)  # CPU generator
        return [cells[i] for i in order[:self.config.views_per_step].tolist()]

    def _render_loss(self, g: FitGaussians, t: int, cells: list[tuple[int, int]],
                     half: bool = False, stats: GradientStats | None = None) -> Tensor:
        """Weighted photometric loss of timestep t on `cells` (target index, view)."""
        params = g.activated(t)
        total, weight_sum, floors = 0.0, 0.0, []
        for index in sorted({i for i, _ in cells}):
            target = self.targets[index]
            views = [v for i, v in cells if i == index]
            images, viewmats, Ks, w, h = target.cameras(views, t, half)
            out = rasterize(**params, viewmats=viewmats, Ks=Ks, width=w, height=h,
                            rasterize_mode=self.config.rasterize_mode)
            rgb = out.rgb + (1 - out.alpha) * self._behind(viewmats, Ks, w, h)
            weights = target.weights[views, t]
            loss = photometric(rgb.permute(0, 3, 1, 2), images, weights,
                               self.config.ssim_weight)
            total = total + loss * weights.sum()
            weight_sum += float(weights.sum())
            floors.append(self._pixel_size(params["means"], viewmats, Ks))
            if stats is not None:
                self._pending_stats = (viewmats, Ks, w)
        loss = total / max(weight_sum, 1e-12)
        return (loss + self._regularisers(params, torch.stack(floors).amin(dim=0))
                + self._ground_flatness(g, params))

    def _behind(self, viewmats: Tensor, Ks: Tensor, w: int, h: int) -> Tensor:
        """What rays that miss the Gaussians see: [C, h, w, 3], or [3] for one colour."""
        if self.environment.degree == 0:
            return self.environment.colour()
        return self.environment.image(viewmats, Ks, w, h)

    @staticmethod
    def _pixel_size(means: Tensor, viewmats: Tensor, Ks: Tensor) -> Tensor:  # -> [N]
        with torch.no_grad():
            z = means @ viewmats[:, 2, :3].T + viewmats[:, 2, 3]  # [N, C]
            size = z / Ks[:, 0, 0]
            return size.masked_fill(z <= 0, float("inf")).amin(dim=1)

    def _regularisers(self, params: dict[str, Tensor], pixel: Tensor) -> Tensor:
        cfg = self.config
        loss = cfg.opacity_weight * params["opacities"].mean()
        if cfg.pixel_size_weight > 0:
            floor = cfg.min_pixel_size * pixel
            largest = params["scales"].amax(dim=-1)
            seen = torch.isfinite(floor)
            short = torch.relu(floor - largest)[seen] / floor[seen]
            loss = loss + cfg.pixel_size_weight * short.mean() if seen.any() else loss
        return loss

    def _ground_flatness(self, g: FitGaussians, params: dict[str, Tensor]) -> Tensor | float:
        """The ground's Gaussians' extent along the plane's normal over their mean size: the
        ring sees the ground at grazing angles, where round splats blend many to a pixel and
        their colours are free to alternate (grain from above); flat ones tile a surface."""
        ground = g.ground
        if self.config.ground_flatness <= 0 or self.plane is None or not bool(ground.any()):
            return 0.0
        axes = quat_to_matrix(params["quats"][ground])  # [M, 3, 3], columns the axes
        scales = params["scales"][ground]
        along = ((axes * self.plane[0][:, None]).sum(dim=-2) * scales).norm(dim=-1)
        size = scales.prod(dim=-1).clamp(min=1e-30) ** (1 / 3)
        return self.config.ground_flatness * (along / size).mean()

    def update_filter(self, g: FitGaussians) -> None:
        """The 3D filter from the cameras of every fitted cell, at the Gaussians' positions."""
        if self.config.filter_variance <= 0:
            return
        c2w, intr = [], []
        for t in range(self.num_steps):
            cells = self._cells(t)
            c2w.append(torch.stack([self.targets[i].c2w[v, t] for i, v in cells])
                       if cells else torch.zeros(0, 4, 4, device=self.device))
            intr.append(torch.stack([self.targets[i].intrinsics[v, t] for i, v in cells])
                        if cells else torch.zeros(0, 6, device=self.device))
        g.set_filter(c2w, intr, self.config.filter_variance)

    def _hold(self, g: FitGaussians, follow: bool = True) -> None:
        """Ground Gaussians back onto the ground plane (after every optimiser step), the
        plane following them along its normal."""
        if self.plane is not None:
            normal, offset = self.plane
            self.plane = (normal, g.hold_on_plane(normal, offset, self.config.ground_opacity,
                                                  follow))

    def _optimizer(self, groups: list[tuple[list[Tensor], float]]) -> torch.optim.Adam:
        lr = self.config.lr
        params = [{"params": p, "lr": rate * lr} for p, rate in groups if p]
        return torch.optim.Adam(params, eps=1e-15)

    def _deadline(self, phase: str) -> float:
        """When `phase` must end: its share of max_seconds counted from the start of the
        fit (time a phase leaves unused goes to the next)."""
        if self.config.max_seconds <= 0:
            return math.inf
        end = PHASE_END[phase] if self.config.joint_steps or phase != "track" else 1.0
        return self.started + end * self.config.max_seconds

    # ---------------------------------------------------------------------- phases
    def initialise(self, t: int, prior: Gaussians | None = None) -> FitGaussians:
        """Plane-sweep points from every cell of timestep t, resampled to one size, and the
        points of `prior` (feed-forward Gaussians of timestep t) that agree with them."""
        images, c2w, intr = [], [], []
        cells = self._cells(t)
        H, W = self.targets[cells[0][0]].size
        scale = self.config.init_resolution / max(H, W)
        size = (max(8, round(H * scale)), max(8, round(W * scale)))
        for index, v in cells:
            target = self.targets[index]
            image = torch.nn.functional.interpolate(
                target.images[v, t][None], size=size, mode="bilinear", antialias=True,
                align_corners=False)[0]
            images.append(image)
            c2w.append(target.c2w[v, t])
            intr.append(target.intrinsics[v, t])
        images, c2w = torch.stack(images).cpu(), torch.stack(c2w).cpu()
        intr = torch.stack(intr).cpu()
        points = plane_sweep_init(images, c2w, intr, self.config, self.generator)
        if prior is not None and len(prior):
            points = self._with_prior(points, prior, images, c2w, intr)
        g = FitGaussians.from_points(points.means.to(self.device),
                                     points.colors.to(self.device),
                                     points.sizes.to(self.device), self.config.init_opacity,
                                     self.num_steps)
        if self.config.ground_lock and points.ground is not None:
            g.ground = points.ground.to(self.device)
            self.plane = tuple(p.to(self.device).float() for p in points.plane)
            self._hold(g, follow=False)
        self.report.initial_count = len(g)
        self.update_filter(g)
        return g

    def _with_prior(self, points: InitPoints, prior: Gaussians, images: Tensor, c2w: Tensor,
                    intr: Tensor) -> InitPoints:
        """`points` and those of `prior` that agree with the images (`prior_points`), up to a
        quarter of the initial budget; they are not on the ground."""
        h, w = images.shape[-2:]
        distance = float(c2w[:, :3, 3].norm(dim=-1).mean())
        sizes = torch.from_numpy(prior.log_scales).mean(dim=-1).exp()
        extra = prior_points(torch.from_numpy(prior.means),
                             sizes.clamp(max=INIT_MAX_SIZE * distance), images, c2w,
                             scale_intrinsics(intr, w, h), points,
                             self.config.init_max_points // 4)
        self.report.prior_count = len(extra.means)
        ground = points.ground
        if ground is not None:
            ground = torch.cat([ground, torch.zeros(len(extra.means), dtype=torch.bool)])
        return InitPoints(torch.cat([points.means, extra.means]),
                          torch.cat([points.colors, extra.colors]),
                          torch.cat([points.sizes, extra.sizes]), ground, points.plane,
                          points.matched)

    def fit_static(self, g: FitGaussians, t: int) -> None:
        cfg, started = self.config, time.perf_counter()
        deadline = self._deadline("fit")
        cells = self._cells(t)
        stats = GradientStats()
        optimizer = self._static_optimizer(g, t)
        steps = cfg.static_steps
        done = 0
        for step in range(steps):
            if time.perf_counter() > deadline:
                break
            self._check()
            progress = step / max(steps - 1, 1)
            decay = 0.01 ** progress  # positions: exponential decay to 1%
            optimizer.param_groups[0]["lr"] = cfg.means_lr * self.extent * cfg.lr * decay
            half = cfg.coarse_to_fine and step < steps // 3
            loss = self._render_loss(g, t, self._pick(cells), half, stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            viewmats, Ks, w = self._pending_stats
            stats.add(g.means[t].grad, g.means[t].detach(), viewmats, Ks, w)
            optimizer.step()
            self._hold(g)
            done = step + 1
            densify = (cfg.densify_every and step > 0 and step % cfg.densify_every == 0
                       and step < cfg.densify_until * steps)
            if densify:
                self.report.density.append(densify_and_prune(
                    g, stats, cfg.densify_grad, cfg.split_size * self.extent,
                    cfg.prune_opacity, 0.5 * self.extent, cfg.max_gaussians, self.generator))
                if cfg.opacity_reset_every and step % cfg.opacity_reset_every == 0:
                    reset_opacity(g, spare=g.ground)
                self.update_filter(g)
                optimizer = self._static_optimizer(g, t)
            if step % 10 == 0 or step == steps - 1:
                self._tell("fit", step + 1, steps, f"loss {loss.item():.4f}, {len(g)} Gaussians")
        self.report.losses["fit"] = loss.item() if done else math.nan
        self._finish_phase("fit", started, done)

    def _static_optimizer(self, g: FitGaussians, t: int) -> torch.optim.Adam:
        cfg = self.config
        groups = [([g.means[t]], cfg.means_lr * self.extent), ([g.quats[t]], cfg.quats_lr),
                  ([g.log_scales], cfg.scales_lr), ([g.opacity_logits], cfg.opacity_lr),
                  ([g.sh0], cfg.colors_lr)]
        if self.learn_background:
            groups.append(([self.environment.coeffs], cfg.background_lr))
        return self._optimizer(groups)

    def track(self, g: FitGaussians, first: int) -> None:
        """Carry the Gaussians from timestep `first` to every other, nearest first."""
        cfg, started = self.config, time.perf_counter()
        deadline = self._deadline("track")
        neighbours, distances = nearest_neighbours(g.means[first].detach(), cfg.neighbours)
        self._neighbours = (neighbours, neighbour_weights(distances))
        order = [(t, t - 1) for t in range(first + 1, self.num_steps)]
        order += [(t, t + 1) for t in range(first - 1, -1, -1)]
        done = 0
        for number, (t, previous) in enumerate(order):
            self._check()
            with torch.no_grad():  # constant velocity from the two timesteps before
                g.means[t].copy_(g.means[previous])
                g.quats[t].copy_(g.quats[previous])
                before = previous - (t - previous)  # not yet tracked: equal, no velocity
                if 0 <= before < self.num_steps:
                    g.means[t].add_(g.means[previous] - g.means[before])
            cells = self._cells(t)
            optimizer = self._optimizer([([g.means[t]], cfg.means_lr * self.extent * 2.0),
                                         ([g.quats[t]], cfg.quats_lr)])
            for _ in range(cfg.track_steps if cells else 0):
                if time.perf_counter() > deadline:
                    break
                loss = self._render_loss(g, t, self._pick(cells))
                loss = loss + self._rigidity(g, t, previous, first)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                g.means[t].grad[g.ground] = 0  # the ground stays where the fit put it
                optimizer.step()
                self._hold(g)
                done += 1
            self._tell("track", number + 1, len(order), f"timestep {t}")
        self._finish_phase("track", started, done)

    def _rigidity(self, g: FitGaussians, t: int, previous: int, first: int) -> Tensor:
        cfg = self.config
        neighbours, weights = self._neighbours
        rigid, rotation, isometry = rigidity_losses(
            g.means[t], g.quats[t], g.means[previous].detach(), g.quats[previous].detach(),
            g.means[first].detach(), neighbours, weights)
        scale = 1.0 / self.extent
        return (cfg.rigidity_weight * rigid * scale + cfg.rotation_weight * rotation
                + cfg.isometry_weight * isometry * scale)

    def polish(self, g: FitGaussians, first: int) -> None:
        cfg, started = self.config, time.perf_counter()
        deadline = self._deadline("polish")
        observed = [t for t in range(self.num_steps) if self._cells(t)]
        groups = [(g.means, cfg.means_lr * self.extent * 0.1), (g.quats, cfg.quats_lr),
                  ([g.log_scales], cfg.scales_lr), ([g.opacity_logits], cfg.opacity_lr),
                  ([g.sh0], cfg.colors_lr)]
        if self.learn_background:
            groups.append(([self.environment.coeffs], cfg.background_lr))
        optimizer = self._optimizer(groups)
        done = 0
        for step in range(cfg.joint_steps if observed else 0):
            if time.perf_counter() > deadline:
                break
            self._check()
            t = observed[int(torch.randint(len(observed), (1,), generator=self.generator))]
            loss = self._render_loss(g, t, self._pick(self._cells(t)))
            if t != first and self.num_steps > 1:
                previous = t - 1 if t > first else t + 1
                loss = loss + self._rigidity(g, t, previous, first)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self._hold(g)
            done = step + 1
            if step % 10 == 0:
                self._tell("polish", step + 1, cfg.joint_steps, f"loss {loss.item():.4f}")
        self._finish_phase("polish", started, done)

    def _finish_phase(self, phase: str, started: float, steps: int) -> None:
        self.report.seconds[phase] = round(time.perf_counter() - started, 3)
        self.report.steps[phase] = steps


def fit_gaussians(
    targets: list[FitTarget],
    config: FitConfig | None = None,
    background: Tensor | None = None,  # [3] fixed background colour; None: learned
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    prior: list[Gaussians] | None = None,
) -> tuple[list[Gaussians], Tensor, FitReport]:
    """Fit persistent Gaussians to the targets' cells; returns one Gaussians container per
    timestep (index i is the same Gaussian in each, in the targets' normalised frame), the
    background colour [3] (a learned environment's mean colour; its coefficients are in
    the report) and a report (time and steps per phase, counts, losses). `prior`: Gaussians
    per timestep from a feed-forward reconstruction, in the same frame; at the timestep the
    fit starts from, those that agree with its frames join the stereo's initial points."""
    config = config or FitConfig()
    if not targets:
        raise ValueError("fit_gaussians: no targets")
    steps = {t.weights.shape[1] for t in targets}
    if len(steps) != 1:
        raise ValueError(f"fit_gaussians: targets disagree on the timesteps: {sorted(steps)}")
    if not any(bool((t.weights > 0).any()) for t in targets):
        raise ValueError("fit_gaussians: no cell has a positive weight")
    fitter = _Fitter(targets, config, torch.device(device), background, progress,
                     should_cancel)
    num_steps = steps.pop()
    weights = [timestep_weight(fitter.targets, t) for t in range(num_steps)]
    first = max(range(num_steps), key=lambda t: (weights[t], -t))
    started = time.perf_counter()
    if prior is not None and len(prior) != num_steps:
        raise ValueError(f"fit_gaussians: {len(prior)} prior timesteps for {num_steps}")
    g = fitter.initialise(first, None if prior is None else prior[first])
    fitter.report.seconds["init"] = round(time.perf_counter() - started, 3)
    fitter.fit_static(g, first)
    fitter.track(g, first)
    fitter.update_filter(g)
    if config.joint_steps:
        fitter.polish(g, first)
    fitter.report.count = len(g)
    if fitter.learn_background:
        fitter.report.environment = fitter.environment.to_list()
    return g.to_gaussians(), fitter.environment.colour().detach().cpu(), fitter.report
