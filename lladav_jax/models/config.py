"""The typed model config: what the model code reads, built once from the user's ConfigDict.

The user's config system stays `ml_collections` (`variants.model_config` presets, overrides like
`--config.model.text.num_layers=4`, `config.json` of a model directory). The entry points of
the models package (`lladav.create`, `lladav.abstract`, `LLaDAV`, `LLaDA`, `SigLIPVision`, ...)
convert at the edge with `ModelConfig.from_config`, which takes a ConfigDict, a plain mapping
of the same layout, or a `ModelConfig` (returned as it is); the layers inside take only the
frozen parts they need. `to_dict` / `to_config` give the ConfigDict layout back.

Shapes below: B batch, L sequence length, D `text.hidden_size`, N image tiles, S
`vision.image_size`, P patches per tile = (S / `vision.patch_size`)^2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp
import ml_collections

from lladav_jax.models.attention import ATTENTION_MASKS, DEFAULT_MAX_TURNS, IMPLEMENTATIONS
from lladav_jax.models.dense import Adapt
from lladav_jax.models.layers import INITS, REMAT_POLICIES, Numerics

CONNECTORS = ("mlp2x_gelu",)
TEXT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # LLaDA's linear layers in a block
VISION_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")  # SigLIP's, in an encoder layer
WEIGHT_FORMATS = ("none", "int8", "int4")  # quantized storage of frozen weights


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaDA: a LLaMA-3-shaped bidirectional transformer. Tokens [B, L] -> logits [B, L, vocab]."""

    vocab_size: int  # embedding rows and head outputs
    hidden_size: int  # D, the residual stream
    num_layers: int  # blocks, stacked along a leading `layers` axis
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (num_heads a multiple of it: grouped queries)
    head_dim: int  # per head; q is [D, num_heads * head_dim]
    intermediate_size: int  # SwiGLU width: gate/up [D, I], down [I, D]
    rope_theta: float  # RoPE base
    rms_norm_eps: float
    max_position_embeddings: int  # the longest sequence trained for (informational)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"text.num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"text.head_dim {self.head_dim} must be even (RoPE halves)")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP: tiles [N, S, S, 3] in [-1, 1] -> features [N, P, hidden_size]."""

    hidden_size: int
    num_layers: int  # encoder layers as stored (27 in so400m)
    select_layer: int  # whose output LLaDA-V reads, negative like HF's `hidden_states[i]`
    num_heads: int  # head_dim = hidden_size / num_heads
    intermediate_size: int  # MLP width: fc1 [hidden, I], fc2 [I, hidden]
    image_size: int  # S, the tile side in pixels
    patch_size: int  # the patch conv's kernel and stride
    layer_norm_eps: float

    def __post_init__(self):
        _ = self.kept_layers  # validates select_layer
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")

    @property
    def kept_layers(self) -> int:
        """Encoder layers that run: `num_layers + select_layer + 1` (26 of 27 for select -2);
        the rest, the final norm and the pooling head are never built."""
        s = self.select_layer
        n = self.num_layers + s + 1 if s < 0 else s
        if not 0 < n <= self.num_layers:
            raise ValueError(f"select_layer {s} out of range for {self.num_layers}")
        return n

    @property
    def num_patches(self) -> int:
        """P: patches (visual features) per tile."""
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The AnyRes layout (`lladav_jax.data.layout`): tiles and visual tokens per sample, with
    fixed maxima so that XLA sees fixed shapes."""

    aspect_ratio: str  # anyres_max_N (+ spatial unpad; stages 2-3) or plain (one tile; stage 1)
    max_grid: int  # grid candidates: rows, cols in 1..max_grid
    max_num_patches: int  # the N of anyres_max_N: downsample above ~N tiles of features
    max_tiles: int  # tiles per sample (base + grid): pixels [B, max_tiles, S, S, 3]
    max_visual_tokens: int  # visual tokens per sample: visual_pos [B, max_visual_tokens]


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """Video samples (`lladav_jax.data.video`): frames chosen at about `fps` a second, at most
    `max_frames` (evenly spread when more; 0: no limit), one tile each; every frame's features
    bilinearly pooled to ceil(side / pool_stride) per side, a newline after each row."""

    max_frames: int = 32
    fps: float = 1.0
    pool_stride: int = 2

    def __post_init__(self):
        if self.max_frames < 0 or self.fps <= 0 or self.pool_stride < 1:
            raise ValueError(f"video: max_frames {self.max_frames} must be >= 0, fps "
                             f"{self.fps} > 0 and pool_stride {self.pool_stride} >= 1")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Vision features -> text embeddings. `mlp2x_gelu`: Linear [vision.hidden_size, D] -> GELU
    (exact erf) -> Linear [D, D], both with bias. In the ConfigDict: `connector="mlp2x_gelu"`."""

    kind: str = "mlp2x_gelu"

    def __post_init__(self):
        if self.kind not in CONNECTORS:
            raise ValueError(f"unknown connector {self.kind!r}; only mlp2x_gelu exists")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (`lladav_jax.models.dense`): y = x W + dropout(x) A B * alpha / rank, with
    A [in, rank] and B [rank, out] trained, W frozen. rank 0: no adapters."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: tuple[str, ...] = TEXT_TARGETS  # LLaDA's layers that get adapters
    vision_targets: tuple[str, ...] = ()  # SigLIP's (none by default)

    def __post_init__(self):
        for field in ("targets", "vision_targets"):  # "q,v" on the command line, or a tuple
            value = getattr(self, field)
            if isinstance(value, str):
                value = [t.strip() for t in value.split(",") if t.strip()]
            object.__setattr__(self, field, tuple(value))
        if self.rank < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.rank {self.rank} must be >= 0 and lora.dropout "
                             f"{self.dropout} in [0, 1)")
        for field, known in (("targets", TEXT_TARGETS), ("vision_targets", VISION_TARGETS)):
            unknown = [t for t in getattr(self, field) if t not in known]
            if unknown:
                raise ValueError(f"lora.{field}: unknown {unknown}; choose among {known}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of frozen weights (`lladav_jax.models.dense`): the language
    model's linear layers, head and embedding table (and the vision tower's linear layers with
    `vision`) stored as int8 (one scale per output channel) or int4 (one scale per `tile`
    inputs of each output channel); activations, adapters and caches stay in `dtype`."""

    weights: str = "none"  # none | int8 | int4
    tile: int = 128  # int4: inputs per scale (a layer narrower than this uses its width)
    vision: bool = False

    def __post_init__(self):
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"quantize.weights {self.weights!r}: choose one of "
                             f"{list(WEIGHT_FORMATS)}")
        if self.tile < 1:
            raise ValueError(f"quantize.tile {self.tile} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaDA-V: the three parts, the connector, and the numeric and memory settings."""

    name: str  # the variant (tiny, small, 1b, 8b) or "hf" for an imported config
    text: TextConfig
    vision: VisionConfig
    image: ImageConfig
    connector: ConnectorConfig
    param_dtype: str  # storage dtype of the parameters (float32 | bfloat16)
    dtype: str  # compute dtype of activations and matmuls; norms and softmax stay float32
    remat_policy: str  # none | full | dots | dots_no_batch | save_attn_out (layers.remat)
    attention_impl: str  # xla | cudnn | splash | chunked | auto (models.attention)
    # bidirectional | conversation: LLaDA-V's dialogue-causal mask over turn ids (models.attention)
    attention_mask: str = "bidirectional"
    max_turns: int = DEFAULT_MAX_TURNS  # the most turns of a sample under the conversation mask
    lora: LoraConfig = LoraConfig()  # adapters (off by default)
    quantize: QuantConfig = QuantConfig()  # quantized frozen weights (off by default)
    video: VideoConfig = VideoConfig()  # frame choice and pooling of video samples
    init: str = "official"  # official | fan_in: the linear layers' random init (layers.INITS)

    def __post_init__(self):
        for field in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}") from None
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of "
                             f"{list(REMAT_POLICIES)}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose one of "
                             f"{IMPLEMENTATIONS}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {list(INITS)}")
        if self.attention_mask not in ATTENTION_MASKS:
            raise ValueError(f"unknown attention_mask {self.attention_mask!r}; choose one of "
                             f"{ATTENTION_MASKS}")
        if not isinstance(self.max_turns, int) or isinstance(self.max_turns, bool) \
                or self.max_turns < 1:
            raise ValueError(f"max_turns {self.max_turns!r} must be an integer >= 1")

    @property
    def numerics(self) -> Numerics:
        """The dtypes and the init every layer takes."""
        return Numerics(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
                        init=self.init)

    @classmethod
    def from_config(cls, cfg: ModelConfigLike) -> ModelConfig:
        """A ModelConfig as it is; a ConfigDict or mapping of the `variants` layout converted
        (every field required, none unknown: a typo fails here, by name)."""
        if isinstance(cfg, ModelConfig):
            return cfg
        d = _as_dict(cfg)
        parts = {"text": TextConfig, "vision": VisionConfig, "image": ImageConfig}
        top = _check_fields(cls, d, "model")
        for name, part in parts.items():
            top[name] = _build(part, d[name], f"model.{name}")
        connector = d["connector"]
        top["connector"] = (connector if isinstance(connector, ConnectorConfig)
                            else ConnectorConfig(str(connector)))
        for name, part in (("lora", LoraConfig), ("quantize", QuantConfig),
                           ("video", VideoConfig)):
            if name in top:
                top[name] = _build(part, top[name], f"model.{name}")
        return cls(**top)

    @property
    def adapted(self) -> bool:
        """Whether the model has adapters or quantized weights (not the plain layout)."""
        return self.lora.rank > 0 or self.quantize.weights != "none"

    def adapt(self, name: str, *, vision: bool = False, adapter: bool = True) -> Adapt:
        """What layer `name` of the language model (or of the vision tower) gets: an adapter
        if it is a LoRA target (and `adapter`), quantized weights if they are set for it."""
        lora, q = self.lora, self.quantize
        rank = lora.rank if adapter and name in (lora.vision_targets if vision
                                                 else lora.targets) else 0
        weights = q.weights if (q.vision or not vision) else "none"
        return Adapt(rank, lora.alpha, lora.dropout, weights, q.tile)

    def plain(self) -> ModelConfig:
        """The same model without adapters or quantization: the layout its base weights have
        in a model directory and in the official release."""
        return dataclasses.replace(self, lora=LoraConfig(), quantize=QuantConfig())

    def to_dict(self) -> dict[str, Any]:
        """The ConfigDict layout as plain data (`connector` as its kind, like the presets)."""
        d = dataclasses.asdict(self)
        d["connector"] = self.connector.kind
        return d

    def to_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.to_dict())


ModelConfigLike = ModelConfig | ml_collections.ConfigDict | Mapping[str, Any]

_T = TypeVar("_T")


def _as_dict(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"a model config is a ModelConfig, ConfigDict or mapping, not {type(cfg)}")


def _check_fields(cls: type, d: Mapping, where: str) -> dict:
    """The fields of `cls` in `d`; those with defaults may be absent (config.json files
    written before they existed)."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING}
    missing = [n for n in names if n not in d and n not in optional]
    unknown = sorted(set(d) - set(names))
    if missing or unknown:
        raise ValueError(f"{where}: " + "; ".join(
            f"{what} {ks}" for what, ks in (("missing fields", missing),
                                            ("unknown fields", unknown)) if ks))
    return {n: d[n] for n in names if n in d}


def _build(cls: type[_T], part, where: str) -> _T:
    if isinstance(part, cls):
        return part
    return cls(**_check_fields(cls, _as_dict(part), where))


def vision_config(vision: VisionConfig | ml_collections.ConfigDict | Mapping) -> VisionConfig:
    """The vision part alone, typed (for functions that take only `cfg.vision`)."""
    return _build(VisionConfig, vision, "model.vision")


__all__ = [
    "CONNECTORS", "TEXT_TARGETS", "VISION_TARGETS", "WEIGHT_FORMATS", "ConnectorConfig",
    "ImageConfig", "LoraConfig", "ModelConfig", "ModelConfigLike", "Numerics", "QuantConfig",
    "TextConfig", "VideoConfig", "VisionConfig", "vision_config",
]
