"""CLIP through open_clip: dense image features (last block without token mixing) and prompt-ensembled text."""
from __future__ import annotations

import copy
from typing import Optional

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CatSegConfig

# Single template of the later (CVPR 2024) design.
CATSEG2_TEMPLATES = ("A photo of a {} in the scene",)
TEMPLATE_SETS = {
    "imagenet80": tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES),
    "catseg2": CATSEG2_TEMPLATES,
    # A handful of plain templates: keeps the tiny preset's text encoding cheap on CPU.
    "simple4": ("a photo of a {}.", "a photo of the {}.", "there is a {} in the scene.", "a {} in the image."),
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_model_config(cfg: CatSegConfig) -> dict:
    """The open_clip CLIP config for a preset, with CLIP's input size set to the preset's."""
    if cfg.clip_cfg is not None:
        model_cfg = copy.deepcopy(cfg.clip_cfg)
    else:
        model_cfg = open_clip.get_model_config(cfg.clip_model)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {cfg.clip_model!r}; see open_clip.list_models()")
        model_cfg = copy.deepcopy(model_cfg)
    model_cfg["vision_cfg"]["image_size"] = cfg.clip_image_size
    model_cfg["text_cfg"]["context_length"] = cfg.clip_context_length
    model_cfg["quick_gelu"] = cfg.clip_quick_gelu
    return model_cfg


def split_synonyms(name: str) -> list[str]:
    """'person, individual' -> ['person', 'individual'] (empty parts dropped)."""
    return [s.strip() for s in name.split(",") if s.strip()]


class ClipEncoder(nn.Module):
    """Wraps an open_clip CLIP: dense MaskCLIP-style image features and template-averaged text embeddings."""

    def __init__(self, cfg: CatSegConfig):
        super().__init__()
        model_cfg = clip_model_config(cfg)
        self.model = open_clip.CLIP(**model_cfg)
        visual = self.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(f"clip_model {cfg.clip_model!r} is not a ViT; CAT-Seg needs a ViT image encoder")
        self.grid = visual.grid_size[0]
        self.image_size = cfg.clip_image_size
        self.last_residual = cfg.clip_last_residual
        self.guidance_layers = tuple(cfg.clip_guidance_layers)
        depth = len(visual.transformer.resblocks)
        if any(not 1 <= i < depth for i in self.guidance_layers):
            raise ValueError(f"clip_guidance_layers={self.guidance_layers} must be 1-based blocks before the last "
                             f"of the {depth}-block image encoder (1..{depth - 1})")
        self.templates = TEMPLATE_SETS[cfg.prompt_templates]
        self.tokenizer = open_clip.SimpleTokenizer(context_length=cfg.clip_context_length)
        self.width = visual.conv1.out_channels
        self.embed_dim = model_cfg["embed_dim"]
        self.grad_checkpointing = False
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # -- image ------------------------------------------------------------------------------------------------
    def encode_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images in [0, 1] -> (L2-normalised dense features (B, C, g, g), tapped block outputs (B, W, g, g))."""
        v = self.model.visual
        x = (images - self.mean) / self.std
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = v.conv1(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        taps = {}
        for i, block in enumerate(blocks[:-1]):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
            if i + 1 in self.guidance_layers:
                taps[i + 1] = rearrange(x[:, 1:], "b (h w) c -> b c h w", h=self.grid)
        x = self._last_block_value_path(blocks[-1], x)
        x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj
        dense = rearrange(x[:, 1:], "b (h w) c -> b c h w", h=self.grid)
        return F.normalize(dense, dim=1), [taps[i] for i in self.guidance_layers]

    def _last_block_value_path(self, block, x: torch.Tensor) -> torch.Tensor:
        # MaskCLIP: no token mixing in the last block; every token goes through value + output projection only.
        attn = block.attn
        width = x.shape[-1]
        w_v = attn.in_proj_weight[2 * width:]
        b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        y = attn.out_proj(F.linear(block.ln_1(x), w_v, b_v))
        residual = x[:, :1] if self.last_residual == "cls" else x
        x = residual + block.ls_1(y)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    # -- text -------------------------------------------------------------------------------------------------
    def encode_text(self, class_names: list[str], batch_size: int = 2048) -> torch.Tensor:
        """Class names -> (N, P, C) L2-normalised embeddings, one per prompt template; synonyms averaged."""
        synonyms = [split_synonyms(n) for n in class_names]
        prompts = [t.format(s) for syns in synonyms for s in syns for t in self.templates]
        device = self.model.token_embedding.weight.device
        tokens = self.tokenizer(prompts)
        feats = torch.cat([self.model.encode_text(tokens[i:i + batch_size].to(device), normalize=True)
                           for i in range(0, len(prompts), batch_size)])
        feats = feats.view(-1, len(self.templates), feats.shape[-1])
        counts = torch.tensor([len(s) for s in synonyms], device=feats.device)
        owner = torch.repeat_interleave(torch.arange(len(class_names), device=feats.device), counts)
        summed = feats.new_zeros(len(class_names), *feats.shape[1:]).index_add_(0, owner, feats)
        return F.normalize(summed / counts.view(-1, 1, 1), dim=-1)

    # -- parameters -------------------------------------------------------------------------------------------
    def attention_parameter_names(self, tower: str = "visual") -> list[str]:
        prefix = "model.visual.transformer." if tower == "visual" else "model.transformer."
        return [n for n, _ in self.named_parameters() if n.startswith(prefix) and ".attn." in n]


def load_clip_weights(encoder: ClipEncoder, path: str) -> None:
    """Load open_clip weights from a local file (downloaded or pre-fetched), never unpickling code.

    The positional embedding is resized to the preset's grid with plain bicubic interpolation (no antialias
    kernel), as the reference implementation initialises it.
    """
    from open_clip.factory import convert_state_dict, load_state_dict
    from open_clip.model import resize_pos_embed

    model = encoder.model
    state = convert_state_dict(model, load_state_dict(path, weights_only=True))
    resize_pos_embed(state, model, interpolation="bicubic", antialias=False)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    model.load_state_dict(state, strict=True)


def download_clip_weights(cfg: CatSegConfig, cache_dir: Optional[str] = None) -> str:
    """Fetch the preset's open_clip weights by tag (needs network) and return the local file."""
    pcfg = open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_pretrained)
    if not pcfg:
        raise ValueError(f"open_clip has no pretrained tag {cfg.clip_pretrained!r} for {cfg.clip_model!r}; "
                         f"available: {open_clip.list_pretrained_tags_by_model(cfg.clip_model)}")
    return open_clip.download_pretrained(pcfg, cache_dir=cache_dir)
