"""Procedural 4D training data, user datasets on disk, and datasets for DataLoader workers.

    config = DataConfig(num_views=4, num_steps=8, height=64, width=64, seed=0)
    sample = make_sample(config, index=0)  # frames [V, T, 3, H, W], depth, alpha, rig
    open_config = DataConfig(scene_kind="open")  # ground plane, sky, sun and shadows
    mixed = DataConfig(scene_kind="mixed", open_fraction=0.5)  # family drawn per sample
    loader = DataLoader(GeneratedDataset(config), batch_size=8, num_workers=2)
"""

from backend.data.config import RIG_KINDS, SCENE_KINDS, DataConfig
from backend.data.dataset import GeneratedDataset, GeneratedIndexDataset, PoolConfig, SamplePool
from backend.data.folder import FolderDataset, write_scene_folder
from backend.data.generator import make_sample
from backend.data.sample import SAMPLE_KINDS, Sample

__all__ = ["RIG_KINDS", "SAMPLE_KINDS", "SCENE_KINDS", "DataConfig", "FolderDataset",
           "GeneratedDataset", "GeneratedIndexDataset", "PoolConfig", "Sample", "SamplePool",
           "make_sample", "write_scene_folder"]
