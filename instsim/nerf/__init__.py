"""Instant-NeRF (hash-grid NeRF) in pure PyTorch: one model per object class, pose-differentiable rendering.

Modules: :mod:`.config` (settings), :mod:`.normalization` (world -> NeRF cube), :mod:`.encoding` (hash grid,
spherical harmonics), :mod:`.network` (the model), :mod:`.occupancy` (empty-space grid), :mod:`.rendering`
(march, composite, render), :mod:`.checkpoint`, :mod:`.train`, :mod:`.metrics`, :mod:`.validate`.
"""
