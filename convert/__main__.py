from moshivis_mlx.blas import use_optimized_blas

use_optimized_blas()  # before MLX loads: the --report forward passes run float32 matmuls

from .cli import main  # noqa: E402

raise SystemExit(main())
