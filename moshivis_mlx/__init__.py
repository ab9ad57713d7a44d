"""MoshiVis, Kyutai's vision-speech model, on Apple Silicon with MLX.

Names are imported on first use, so `import moshivis_mlx` is instant and
`moshivis_mlx.cpu.blas` can run before MLX itself is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": "weights.checkpoint",
    "Conversation": "session.conversation",
    "ConversationClosed": "session.pipeline",
    "DepformerConfig": "model.config",
    "EchoCanceller": "audio.echo",
    "ImageError": "model.image",
    "FrameOutput": "session.pipeline",
    "ImageKV": "model.temporal",
    "IncompatibleModelError": "session.conversation",
    "ModelConfig": "model.config",
    "MoshiVis": "model.model",
    "MimiError": "audio.mimi",
    "SamplerConfig": "model.sampling",
    "StageError": "session.pipeline",
    "StepOutput": "model.stream",
    "Stream": "model.stream",
    "TokenSampler": "model.sampling",
    "VisionConfig": "model.config",
    "load": "weights.loading",
    "load_mimi": "audio.mimi",
    "moshika_vis": "model.config",
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
    from .audio.echo import EchoCanceller
    from .audio.mimi import MimiError, load_mimi
    from .model.config import DepformerConfig, ModelConfig, VisionConfig, moshika_vis
    from .model.image import ImageError
    from .model.model import MoshiVis
    from .model.sampling import SamplerConfig, TokenSampler
    from .model.stream import StepOutput, Stream
    from .model.temporal import ImageKV
    from .session.conversation import Conversation, IncompatibleModelError
    from .session.pipeline import ConversationClosed, FrameOutput, StageError
    from .weights.checkpoint import CheckpointError
    from .weights.loading import load
