"""Spatial parallelism: receptive-field segmentation (RFS) and fused-block tiled execution.

A fused block of conv/pool layers is cut into spatial tiles; each tile is computed from a crop of
the block's input that includes exactly the halo its receptive field needs, so several workers can
run one block in parallel and the stitched output equals the unsplit computation.

* :mod:`runtime.parallel.receptive`: the geometry and halo arithmetic, pure Python (no torch), so
  the planner (``planner.dpfp``) can use it anywhere.
* :mod:`runtime.parallel.tiled`: runs a segment of a model tile by tile (torch).

This package module imports neither, so importing ``runtime.parallel.receptive`` never pulls torch.
"""
