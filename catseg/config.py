"""Model configuration: one typed dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

FINETUNE_MODES = ("attention", "frozen", "full", "qv")
BACKBONES = ("resnet", "swin", "clip", "none")
AGGREGATIONS = ("cost", "feature")
UPSAMPLERS = ("bilinear", "transposed")
LAST_RESIDUALS = ("token", "cls")
SYNONYM_RULES = ("mean", "first")


def _int(name: str, value: Any, least: Optional[int], note: str = "") -> None:
    """Refuse anything but an integer (>= least unless None; a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        bound = f" >= {least}" if least is not None else ""
        raise ValueError(f"{name}={value!r} must be an integer{bound}{' ' + note if note else ''}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, allowed))}")


@dataclass
class CatSegConfig:
    """Everything that defines a CAT-Seg model; presets override only what differs."""

    name: str = "custom"  # preset name, stored in saved weights so a file is never loaded into another preset
    image_size: int = 384  # training crop size fed to the model (H = W)
    # CLIP
    clip_model: str = "ViT-B-16"  # open_clip architecture name
    clip_pretrained: str = "openai"  # open_clip pretrained tag used by pretrained=True
    clip_cfg: Optional[dict] = None  # explicit open_clip CLIP config (embed_dim/vision_cfg/text_cfg), else by name
    clip_quick_gelu: bool = True  # OpenAI weights were trained with QuickGELU
    clip_image_size: int = 384  # CLIP input resolution; the cost grid is clip_image_size / patch size
    clip_context_length: int = 77  # text tokens per prompt
    clip_last_residual: str = "token"  # last block residual: each token (paper) or the CLS token (later design)
    clip_guidance_layers: tuple = ()  # 1-based CLIP blocks tapped for decoder guidance when backbone == "clip"
    prompt_templates: str = "imagenet80"  # template set name, see catseg.clip.TEMPLATE_SETS
    synonyms: str = "mean"  # 'a, b' class names: average the synonyms' embeddings (paper) or use the first (later)
    finetune: str = "attention"  # which CLIP parameters train, see CatSeg.set_clip_trainable
    # feature backbone for embedding guidance and the decoder
    backbone: str = "resnet"  # resnet | swin (timm), clip (CLIP's own features), none
    backbone_model: str = "resnet101.tv_in1k"  # timm model name (with pretrained tag)
    backbone_indices: tuple = (1, 2, 3)  # timm feature stages at strides 4, 8, 16
    backbone_frozen: bool = False  # Swin-B is frozen in the paper's ViT-L/H/G models
    # BatchNorm of the backbone frozen in training: its statistics and affine weights stay as loaded and it normalises
    # with the running statistics, as the reference's ResNet (detectron2's FrozenBN); off for a backbone trained from
    # scratch
    backbone_frozen_bn: bool = True
    backbone_out_norm: bool = False  # LayerNorm on each backbone output (the release's detectron2 Swin wrapper)
    # timm's drop_path_rate for the backbone (stochastic depth, active in training mode also when frozen); None: the
    # timm model's default
    backbone_drop_path_rate: Optional[float] = None
    # aggregation
    embed_dim: int = 128  # d_F, the cost embedding width
    num_layers: int = 2  # N_B aggregation layers
    num_heads: int = 4
    window_size: int = 12  # Swin window on the cost grid; the second block shifts by half of it
    mlp_ratio: float = 4.0
    class_pool_train: int = 2  # average-pool factor before class aggregation during training (1 = off)
    zero_init_residual: bool = True  # aggregation blocks start as the identity (residual branches end in zeros)
    appearance_guidance_dim: int = 128  # projected visual guidance width (0 = no visual guidance)
    text_guidance_dim: int = 128  # projected text guidance width (0 = no text guidance)
    text_guidance_renormalize: bool = False  # L2-normalise the template-averaged text before projecting it
    # upsampling decoder
    decoder_dims: tuple = (64, 32)  # output widths of the N_U decoder stages
    decoder_guidance_dims: tuple = (32, 16)  # projected backbone feature widths concatenated at each stage
    decoder_upsample: str = "bilinear"  # bilinear (paper) or transposed convolution (later release)
    clip_guidance_upsample_dims: tuple = (256, 128)  # transposed-conv widths of CLIP taps when backbone == "clip"
    clip_guidance_normalized: bool = True  # backbone "clip": guide with L2-normalised dense features (False: raw)
    # class aggregation details of the later release (defaults: the paper's design)
    class_pool_eval: bool = False  # also average-pool by class_pool_train before class aggregation in evaluation
    class_pooled_residual: bool = False  # x + up(pool(x) + update), aligned corners (release); else x + up(update)
    class_guidance_norm: bool = True  # LayerNorm on the text guidance before the query/key projections
    class_attention_proj: bool = True  # output projection after the class attention
    class_pad_to: int = 0  # pad the classes to this many with learned tokens before class aggregation (0 = off)
    # ablation switches (paper tables 2, 7, 8, 10)
    aggregation: str = "cost"  # cost volume (ours) or feature concatenation baseline
    spatial_aggregation: bool = True
    class_aggregation: bool = True
    embedding_guidance: bool = True
    upsampling_decoder: bool = True
    # inference
    class_chunk_size: Optional[int] = None  # classes per chunk for the per-class work (None = all at once)
    top_k_classes: Optional[int] = None  # prune to the k classes with the highest max cosine similarity (off)
    inference_size: int = 640  # patch inference: resize the image to this square size
    inference_stride: int = 256  # patch inference: stride of the image_size crops
    # patch inference: each view's logits are upsampled to the crop size and the sigmoid taken there, as the released
    # code does; False takes it at the model's output size (1/4 of the crop) and upsamples the probabilities, a
    # sixteenth of the maps to merge, with labels that differ near class boundaries
    sigmoid_at_crop_size: bool = True
    # weight locations for offline clusters: a folder written by `python -m catseg.download`
    weights_dir: Optional[str] = None
    extra: dict = field(default_factory=dict)  # free-form notes carried with the config

    def __post_init__(self):
        _choice("finetune", self.finetune, FINETUNE_MODES)
        _choice("backbone", self.backbone, BACKBONES)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("decoder_upsample", self.decoder_upsample, UPSAMPLERS)
        _choice("clip_last_residual", self.clip_last_residual, LAST_RESIDUALS)
        _choice("synonyms", self.synonyms, SYNONYM_RULES)
        for name in ("zero_init_residual", "backbone_out_norm", "text_guidance_renormalize", "clip_guidance_normalized",
                     "class_pool_eval", "class_pooled_residual", "class_guidance_norm", "class_attention_proj",
                     "sigmoid_at_crop_size"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        _int("class_pad_to", self.class_pad_to, 0, "(0 = no padding)")
        for name in ("image_size", "clip_image_size", "clip_context_length", "embed_dim", "num_heads", "window_size",
                     "inference_size", "inference_stride", "class_pool_train"):
            _int(name, getattr(self, name), 1)
        _int("num_layers", self.num_layers, 0)
        for name in ("appearance_guidance_dim", "text_guidance_dim"):
            _int(name, getattr(self, name), 0, "(0 = no guidance)")
        for name in ("class_chunk_size", "top_k_classes"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1, "or None")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio * self.embed_dim >= 1:
            raise ValueError(f"mlp_ratio={ratio!r} must be a number with mlp_ratio * embed_dim >= 1 (the MLP's "
                             f"hidden width; embed_dim={self.embed_dim})")
        rate = self.backbone_drop_path_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1):
            raise ValueError(f"backbone_drop_path_rate={rate!r} must be a number in [0, 1) or None (timm's default)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        for name, least in (("decoder_dims", 1), ("decoder_guidance_dims", 0), ("backbone_indices", None),
                            ("clip_guidance_layers", 1), ("clip_guidance_upsample_dims", 1)):
            values = getattr(self, name)
            if (isinstance(values, (str, bytes)) or not hasattr(values, "__iter__")
                    or any(isinstance(v, bool) or not isinstance(v, int) or (least is not None and v < least)
                           for v in values)):
                raise ValueError(f"{name}={values!r} must be a list of integers"
                                 f"{f' >= {least}' if least is not None else ''}")
            setattr(self, name, tuple(values))
        if len(self.decoder_dims) != len(self.decoder_guidance_dims):
            raise ValueError(f"decoder_dims {self.decoder_dims} and decoder_guidance_dims "
                             f"{self.decoder_guidance_dims} must have the same length (one per decoder stage)")
        if self.backbone in ("resnet", "swin") and len(self.backbone_indices) != len(self.decoder_dims) + 1:
            raise ValueError(f"backbone_indices {self.backbone_indices} must name {len(self.decoder_dims) + 1} feature "
                             f"stages: the guidance stage and one per decoder stage (decoder_dims {self.decoder_dims})")
        if self.backbone == "clip":
            for name in ("clip_guidance_layers", "clip_guidance_upsample_dims"):
                if len(getattr(self, name)) != len(self.decoder_dims):
                    raise ValueError(f"backbone='clip' needs one {name} entry per decoder stage "
                                     f"({len(self.decoder_dims)}), got {getattr(self, name)}")
        if self.inference_size < self.image_size:
            raise ValueError(f"inference_size={self.inference_size} must be >= image_size={self.image_size}")
        if self.inference_stride > self.image_size:
            raise ValueError(f"inference_stride={self.inference_stride} must be <= image_size={self.image_size}, or "
                             f"the crops leave pixels uncovered")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **overrides) -> "CatSegConfig":
        """Return a copy with `overrides` applied; unknown names fail listing the valid ones."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
