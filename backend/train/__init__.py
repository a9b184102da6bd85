"""Training and evaluation entry points for the diffusion and reconstruction models.

    from backend.train import DiffusionTrainConfig, train_diffusion
    train_diffusion(DiffusionTrainConfig(steps=2000, output_dir="out/train/diffusion"))

Command line (also under `torchrun --nproc_per_node=N`): `python -m backend.train --help`.
"""

from backend.train.common import (
    DistributedContext,
    ExponentialMovingAverage,
    TrainingJob,
    TrainLoopConfig,
    cosine_learning_rate,
    list_checkpoints,
    load_checkpoint,
    run_training,
    save_checkpoint,
    setup_distributed,
)
from backend.train.diffusion import DiffusionTrainConfig, sample_cell_masks, train_diffusion
from backend.train.evaluate import (
    HELD_OUT_START,
    SETTINGS,
    EvalConfig,
    copy_baseline,
    evaluate_all,
    run_evaluation,
)
from backend.train.recon import ReconTrainConfig, train_recon

__all__ = ["HELD_OUT_START", "SETTINGS", "DiffusionTrainConfig", "DistributedContext",
           "EvalConfig", "ExponentialMovingAverage", "ReconTrainConfig", "TrainLoopConfig",
           "TrainingJob", "copy_baseline", "cosine_learning_rate", "evaluate_all",
           "list_checkpoints", "load_checkpoint", "run_evaluation", "run_training",
           "sample_cell_masks", "save_checkpoint", "setup_distributed", "train_diffusion",
           "train_recon"]
