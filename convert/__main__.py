"""`python -m convert ...` from the repository's root: the same as `python -m moshivis_mlx convert ...`.

The converter itself is `moshivis_mlx.weights.convert`; this folder is only this entry point and is not
installed (a global package named `convert` would shadow any other)."""

import sys

from moshivis_mlx.__main__ import convert

sys.exit(convert())
