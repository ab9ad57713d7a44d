"""MoshiVis, Kyutai's vision-speech model, on Apple Silicon with MLX."""

from .config import DepformerConfig, ModelConfig, VisionConfig, moshika_vis
from .model import MoshiVis
from .sampling import SamplerConfig, TokenSampler
from .loading import load
from .checkpoint import CheckpointError
from .conversation import Conversation, IncompatibleModelError
from .stream import Stream, StepOutput
from .temporal import ImageKV

__all__ = [
    "CheckpointError",
    "Conversation",
    "DepformerConfig",
    "ImageKV",
    "IncompatibleModelError",
    "ModelConfig",
    "load",
    "MoshiVis",
    "SamplerConfig",
    "StepOutput",
    "Stream",
    "TokenSampler",
    "VisionConfig",
    "moshika_vis",
]
