"""Model configuration: every size of MoshiVis, as dataclasses.

`ModelConfig.from_dict` reads both this project's `config.json` and the
reference-fixture format (the one written next to the official PyTorch
outputs), so a tiny checkpoint describes itself either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Norm flavours. The official PyTorch code normalises the depformer and
# `norm_xa` by the unbiased variance; upstream MLX/Rust use the mean square.
NORM_VARIANCE = "variance"
NORM_MEAN_SQUARE = "mean_square"
NORM_KINDS = (NORM_VARIANCE, NORM_MEAN_SQUARE)

TEXT_PADDING_IDS = (0, 3)  # end-of-padding and padding: print nothing
NUM_CODEBOOKS_PER_SPEAKER = 8


@dataclass
class DepformerConfig:
    dim: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    ffn_hidden: int = 2816
    num_steps: int = 8  # one per generated audio codebook
    norm_eps: float = 1e-8

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class VisionConfig:
    """SigLIP vision tower (PaliGemma2's So400m by default)."""

    width: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    mlp_hidden: int = 4304
    patch_size: int = 14
    image_size: int = 448
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


@dataclass
class ModelConfig:
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    ffn_hidden: int = 11264
    context: int = 3000  # keys visible to a step, the current one included
    rope_max_period: float = 10000.0
    norm_eps: float = 1e-8
    text_card: int = 32000
    audio_card: int = 2048
    num_audio_codebooks: int = 16  # 8 generated + 8 from the user
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    gate_hidden: int = 512
    xa_start: int = 16
    norm_xa_eps: float = 1e-5
    # How the depformer norms and `norm_xa` normalise (see NORM_KINDS).
    depformer_norm: str = NORM_VARIANCE
    depformer: DepformerConfig = field(default_factory=DepformerConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        self.delays = tuple(int(d) for d in self.delays)
        if self.depformer_norm not in NORM_KINDS:
            raise ValueError(f"depformer_norm must be one of {NORM_KINDS}, got {self.depformer_norm!r}")
        if len(self.delays) != 1 + self.num_audio_codebooks:
            raise ValueError(
                f"{len(self.delays)} delays given for 1 text + {self.num_audio_codebooks} audio streams"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_generated_codebooks(self) -> int:
        return self.depformer.num_steps

    @property
    def num_user_codebooks(self) -> int:
        return self.num_audio_codebooks - self.depformer.num_steps

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.audio_card

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["delays"] = list(self.delays)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from our own `config.json` or from a reference-fixture one."""
        if "temporal_transformer" in data:
            return _from_fixture_config(data)
        data = dict(data)
        data.pop("quantization", None)
        data.pop("cache_quantization", None)
        data.pop("model_type", None)
        data.pop("format", None)
        depformer = DepformerConfig(**data.pop("depformer", {}))
        vision = VisionConfig(**data.pop("vision", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data, depformer=depformer, vision=vision)


def moshika_vis() -> ModelConfig:
    """The released kyutai/moshika-vis model."""
    return ModelConfig()


PRESETS = {"moshika-vis": moshika_vis}


def _from_fixture_config(data: dict[str, Any]) -> ModelConfig:
    tt = data["temporal_transformer"]
    dep = data["depformer"]
    xa = data["cross_attention"]
    vocab = data["vocab"]
    image = data.get("image", {})
    siglip = image.get("siglip", {})
    vision = VisionConfig(
        width=siglip.get("hidden_size", VisionConfig.width),
        num_layers=siglip.get("num_hidden_layers", VisionConfig.num_layers),
        num_heads=siglip.get("num_attention_heads", VisionConfig.num_heads),
        mlp_hidden=siglip.get("intermediate_size", VisionConfig.mlp_hidden),
        patch_size=siglip.get("patch_size", VisionConfig.patch_size),
        image_size=siglip.get("image_size", VisionConfig.image_size),
        layer_norm_eps=siglip.get("layer_norm_eps", VisionConfig.layer_norm_eps),
    )
    return ModelConfig(
        dim=tt["dim"],
        num_layers=tt["num_layers"],
        num_heads=tt["num_heads"],
        ffn_hidden=tt["ffn_hidden"],
        context=tt["context"],
        rope_max_period=float(tt["rope_max_period"]),
        norm_eps=tt["norm"]["eps"],
        text_card=vocab["text_card"],
        audio_card=vocab["audio_card"],
        num_audio_codebooks=vocab["n_q"],
        delays=tuple(vocab["delays"]),
        gate_hidden=xa["gate_hidden"],
        xa_start=xa["xa_start"],
        norm_xa_eps=image.get("norm_xa", {}).get("eps", 1e-5),
        depformer=DepformerConfig(
            dim=dep["dim"],
            num_layers=dep["num_layers"],
            num_heads=dep["num_heads"],
            ffn_hidden=dep["ffn_hidden"],
            num_steps=dep["weights_per_step"],
            norm_eps=dep["norm"]["eps"],
        ),
        vision=vision,
    )
