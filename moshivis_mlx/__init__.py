"""MoshiVis, Kyutai's vision-speech model, on Apple Silicon with MLX."""

from .config import DepformerConfig, ModelConfig, VisionConfig, moshika_vis
from .model import MoshiVis
from .sampling import SamplerConfig, TokenSampler
from .loading import load
from .checkpoint import CheckpointError
from .stream import Stream, StepOutput
from .temporal import ImageKV

__all__ = [
    "CheckpointError",
    "DepformerConfig",
    "ImageKV",
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
