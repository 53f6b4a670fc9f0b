"""Model presets: each lists only what differs from CatSegConfig's defaults (the paper's ViT-B design)."""
from __future__ import annotations

from .config import CatSegConfig

# The release's Swin-B is built with the first three stages only (2 + 2 + 18 blocks) and stochastic depth rising
# linearly from 0 to 0.3 over those 22 blocks, active in training although its weights do not learn. timm spreads its
# rate over all 24 blocks of Swin-B, so 0.3 * 23 / 21 gives each of the 22 used blocks the release's rate.
_SWIN = dict(backbone="swin", backbone_model="swin_base_patch4_window12_384.ms_in22k", backbone_indices=(0, 1, 2),
             backbone_frozen=True, clip_image_size=336, backbone_drop_path_rate=0.3 * 23 / 21)

# The later (CVPR 2024) design: no extra backbone; CLIP's own intermediate blocks, upsampled by transposed
# convolutions, guide the decoder; one prompt template; q/v fine-tuning of both towers; CLS residual in the last
# block; class aggregation over classes padded to 256, pooled 2x2 in training and not in evaluation (the release's
# evaluation protocol; class_pool_eval=True matches its model run with the training pooling). Top-256 pruning is
# left off.
_CATSEG2 = dict(backbone="clip", clip_guidance_upsample_dims=(256, 128), decoder_upsample="transposed",
                prompt_templates="catseg2", synonyms="first", finetune="qv", clip_last_residual="cls",
                clip_guidance_normalized=False, class_pooled_residual=True, class_guidance_norm=False,
                class_attention_proj=False, class_pad_to=256)


def _tiny_clip(vision_layers: int) -> dict:
    return dict(embed_dim=64, vision_cfg=dict(image_size=128, layers=vision_layers, width=64, head_width=32,
                                              patch_size=16),
                text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2))


_TINY = dict(
    image_size=128, clip_image_size=128, clip_model="tiny", clip_pretrained="none", clip_quick_gelu=False,
    clip_cfg=_tiny_clip(vision_layers=2), clip_context_length=16, prompt_templates="simple4",
    backbone_model="resnet10t", backbone_frozen_bn=False, embed_dim=32, num_heads=2, window_size=4,
    appearance_guidance_dim=32, text_guidance_dim=32, decoder_dims=(16, 8), decoder_guidance_dims=(8, 4),
    inference_size=192, inference_stride=64)

PRESETS: dict[str, dict] = {
    # CLIP ViT-B/16 (OpenAI) at 384 (positional embedding resized 14 -> 24), ResNet-101 guidance, lr x0.01
    "catseg_vitb16_r101": dict(),
    # CLIP ViT-L/14@336 (OpenAI), frozen Swin-B (ImageNet-21k, 384) guidance
    "catseg_vitl14_swinb": dict(clip_model="ViT-L-14-336", **_SWIN),
    # OpenCLIP ViT-H/14 and ViT-bigG/14 trained on LAION-2B, run at 336 like ViT-L
    "catseg_vith14_swinb": dict(clip_model="ViT-H-14", clip_pretrained="laion2b_s32b_b79k", clip_quick_gelu=False,
                                **_SWIN),
    "catseg_vitg14_swinb": dict(clip_model="ViT-bigG-14", clip_pretrained="laion2b_s39b_b160k",
                                clip_quick_gelu=False, **_SWIN),
    # Later design: CLIP ViT-B/16 (OpenAI) at 384, guidance from blocks 4 and 8
    "catseg2_vitb16": dict(clip_guidance_layers=(4, 8), **_CATSEG2),
    # Later design: CLIP ViT-L/14@336 (OpenAI), 384 px input resized to 336, guidance from blocks 8 and 16
    "catseg2_vitl14": dict(clip_model="ViT-L-14-336", clip_image_size=336, clip_guidance_layers=(8, 16), **_CATSEG2),
    # A few narrow layers on 128 px images: tests and the CPU quickstart (random weights only)
    "catseg_tiny": _TINY,
    # The later design at the tiny size (three CLIP blocks so two can guide): tests of it and of the converter
    "catseg2_tiny": {**_TINY, **_CATSEG2, "clip_cfg": _tiny_clip(vision_layers=3), "clip_guidance_layers": (1, 2),
                     "clip_guidance_upsample_dims": (32, 16), "class_pad_to": 12,
                     # its tests compare every block against the release's computation: no identity blocks
                     "zero_init_residual": False},
}

# The computation of the paper design's released weights (model_final_*.pth): transposed-convolution decoder,
# the (pooled) input re-added with the class-aggregation update, no text-guidance LayerNorm or attention output
# projection, template-averaged text re-normalised; the Swin wrapper norms its outputs.
_PAPER_RELEASE = dict(decoder_upsample="transposed", class_pooled_residual=True, class_guidance_norm=False,
                      class_attention_proj=False, text_guidance_renormalize=True)
for _name in ("catseg_vitb16_r101", "catseg_vitl14_swinb", "catseg_vith14_swinb", "catseg_vitg14_swinb"):
    PRESETS[f"{_name}_release"] = {**PRESETS[_name], **_PAPER_RELEASE,
                                   "backbone_out_norm": PRESETS[_name].get("backbone") == "swin"}


def get_config(name: str, **overrides) -> CatSegConfig:
    """The preset's config with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return CatSegConfig(name=name, **PRESETS[name]).replace(**overrides)


NOT_OVERRIDES = ("name", "weights_dir")  # config fields that are no part of a model: its name, where weights are kept


def preset_overrides(cfg: CatSegConfig) -> dict:
    """The fields of `cfg` that differ from its preset's ({} for a config of no preset), JSON-ready (tuples as
    lists): with the preset's name they rebuild the model, as create_model(cfg.name, **overrides)."""
    if cfg.name not in PRESETS:
        return {}
    base, own = CatSegConfig(name=cfg.name, **PRESETS[cfg.name]).to_dict(), cfg.to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in own.items()
            if k not in NOT_OVERRIDES and v != base[k]}
