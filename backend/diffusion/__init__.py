"""The 4D video diffusion transformer: fused view-time attention, 3D RoPE, model, sampler."""
