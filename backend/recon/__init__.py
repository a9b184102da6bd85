"""Feed-forward 4D reconstruction: a views x timesteps grid of frames -> Gaussians per timestep."""

from backend.recon.config import PRESETS, ReconConfig
from backend.recon.losses import (
    ReconLoss,
    ReconLossWeights,
    camera_loss,
    depth_l1,
    psnr,
    reconstruction_loss,
    ssim,
)
from backend.recon.model import ReconModel, ReconOutput, assemble_gaussians
from backend.recon.refine import RefineConfig, refine, sequence_photometric_loss
from backend.recon.splats import GaussianBatch, RenderedGrid, render_gaussian_batch

__all__ = [
    "PRESETS",
    "GaussianBatch",
    "ReconConfig",
    "ReconLoss",
    "ReconLossWeights",
    "ReconModel",
    "ReconOutput",
    "RefineConfig",
    "RenderedGrid",
    "assemble_gaussians",
    "camera_loss",
    "depth_l1",
    "psnr",
    "reconstruction_loss",
    "refine",
    "render_gaussian_batch",
    "sequence_photometric_loss",
    "ssim",
]
