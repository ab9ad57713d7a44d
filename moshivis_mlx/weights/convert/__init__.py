"""Convert released MoshiVis checkpoints into quantized MLX checkpoints."""

from .converter import ConvertError, ConvertResult, convert_checkpoint

__all__ = ["ConvertError", "ConvertResult", "convert_checkpoint"]
