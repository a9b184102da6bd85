"""The fitting stage: persistent 4D Gaussians optimised against the user's own frames, at
their resolution. The learned models initialise it and fill cells nobody rendered; the
detail comes from the user's pixels."""

from backend.fit.config import PRESETS, FitConfig
from backend.fit.fit import FitCancelled, FitReport, fit_gaussians
from backend.fit.targets import FitTarget

__all__ = ["PRESETS", "FitCancelled", "FitConfig", "FitReport", "FitTarget", "fit_gaussians"]
