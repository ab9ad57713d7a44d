"""MoshiVis, Kyutai's vision-speech model, on Apple Silicon with MLX.

Names are imported on first use, so `import moshivis_mlx` is instant and
`moshivis_mlx.blas` can run before MLX itself is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "Conversation": "conversation",
    "ConversationClosed": "pipeline",
    "DepformerConfig": "config",
    "EchoCanceller": "echo",
    "ImageError": "image",
    "FrameOutput": "pipeline",
    "ImageKV": "temporal",
    "IncompatibleModelError": "conversation",
    "ModelConfig": "config",
    "MoshiVis": "model",
    "MimiError": "mimi",
    "SamplerConfig": "sampling",
    "StageError": "pipeline",
    "StepOutput": "stream",
    "Stream": "stream",
    "TokenSampler": "sampling",
    "VisionConfig": "config",
    "load": "loading",
    "load_mimi": "mimi",
    "moshika_vis": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moshivis_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .checkpoint import CheckpointError
    from .config import DepformerConfig, ModelConfig, VisionConfig, moshika_vis
    from .conversation import Conversation, IncompatibleModelError
    from .echo import EchoCanceller
    from .image import ImageError
    from .loading import load
    from .mimi import MimiError, load_mimi
    from .model import MoshiVis
    from .pipeline import ConversationClosed, FrameOutput, StageError
    from .sampling import SamplerConfig, TokenSampler
    from .stream import StepOutput, Stream
    from .temporal import ImageKV
