"""The CPU platform: what makes MLX's CPU backend fast, and the one place it is applied.

  platform_path.py  which path a loaded model runs: what a GPU runs, or the CPU counterparts (chosen by `load`)
  model.py          the CPU counterparts of the model's modules, and the function that swaps them in
  layers.py         the CPU counterparts of the building blocks, and the tricks they use
  cores.py          large products spread over the cores, one MLX CPU stream per core
  blas.py           an optimized BLAS, loaded before MLX (Linux)
  malloc.py         jemalloc, by restarting the program once (Linux)

This file imports nothing, and blas.py and malloc.py nothing from MLX: they run before MLX is loaded.
"""
