"""4D generation backend: fused view-time video diffusion and feed-forward 4D reconstruction."""

__version__ = "0.1.0"
