"""CLIP through open_clip: dense image features (last block without token mixing) and prompt-ensembled text."""
from __future__ import annotations

import copy
from collections import OrderedDict
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


def attention_modules(module: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """Every multi-head attention of a CLIP (both towers), with its name."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]


def is_split(attn: nn.MultiheadAttention) -> bool:
    """Whether the attention holds separate q/k/v projection weights instead of one fused in_proj_weight."""
    return attn.in_proj_weight is None


def split_qkv(attn: nn.MultiheadAttention) -> None:
    """Replace the fused in-projection weight by separate q/k/v weights, so q and v can train while k does not.

    nn.MultiheadAttention runs this layout natively (its kdim != embed_dim path), with the same arithmetic; the
    fused bias stays one tensor. Parameter names become attn.{q,k,v}_proj_weight. Call before an optimizer exists.
    """
    if is_split(attn):
        return
    fused = attn.in_proj_weight
    q, k, v = (nn.Parameter(t.detach().clone(), requires_grad=fused.requires_grad) for t in fused.chunk(3, dim=0))
    attn.register_parameter("in_proj_weight", None)
    attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight = q, k, v
    attn._qkv_same_embed_dim = False


def value_projection(attn: nn.MultiheadAttention) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The value projection's (weight, bias) in either layout."""
    width = attn.embed_dim
    weight = attn.v_proj_weight if is_split(attn) else attn.in_proj_weight[2 * width:]
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    return weight, bias


def _match_qkv_layout(attn, state_dict, prefix, *args) -> None:
    # Weight files may hold either layout (open_clip's fused one, or q/k/v split by the "qv" fine-tuning mode);
    # rewrite them to this module's current layout so both load everywhere.
    fused_key, split_keys = prefix + "in_proj_weight", [prefix + f"{c}_proj_weight" for c in "qkv"]
    if is_split(attn) and fused_key in state_dict:
        for key, part in zip(split_keys, state_dict.pop(fused_key).chunk(3, dim=0)):
            state_dict[key] = part
    elif not is_split(attn) and all(k in state_dict for k in split_keys):
        state_dict[fused_key] = torch.cat([state_dict.pop(k) for k in split_keys], dim=0)


def _count_load(module: nn.Module, incompatible_keys) -> None:
    """Post-hook of a weight load that reached a text-tower module (loaded into it or into a module holding it)."""
    module._text_loads = getattr(module, "_text_loads", 0) + 1


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
        if cfg.prompt_templates not in TEMPLATE_SETS:
            raise ValueError(f"prompt_templates={cfg.prompt_templates!r} is not valid; choose one of: "
                             f"{', '.join(TEMPLATE_SETS)}")
        self.templates = TEMPLATE_SETS[cfg.prompt_templates]
        self.synonyms = cfg.synonyms
        for _, attn in attention_modules(self.model):
            attn.register_load_state_dict_pre_hook(_match_qkv_layout)
        # the text tower's modules (all of CLIP's but the image tower's) count the weight loads that reach them
        self._text_modules = [m for name, m in self.model.named_modules() if name.partition(".")[0] != "visual"]
        for m in self._text_modules:
            m.register_load_state_dict_post_hook(_count_load)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=cfg.clip_context_length)
        self._prompt_cache: OrderedDict = OrderedDict()
        self.width = visual.conv1.out_channels
        self.embed_dim = model_cfg["embed_dim"]
        self.grad_checkpointing = False
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def text_loads(self) -> int:
        """How many times weights were loaded into the text tower's modules (a count that only grows), whatever
        module `load_state_dict` was called on: the whole model, this encoder, its open_clip model or a text block."""
        return sum(getattr(m, "_text_loads", 0) for m in self._text_modules)

    # -- image ------------------------------------------------------------------------------------------------
    def encode_dense(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images in [0, 1] -> (dense features (B, C, g, g), L2-normalised unless told not to; tapped block
        outputs (B, W, g, g))."""
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
        return F.normalize(dense, dim=1) if normalize else dense, [taps[i] for i in self.guidance_layers]

    def _last_block_value_path(self, block, x: torch.Tensor) -> torch.Tensor:
        # MaskCLIP: no token mixing in the last block; every token goes through value + output projection only.
        attn = block.attn
        w_v, b_v = value_projection(attn)
        y = attn.out_proj(F.linear(block.ln_1(x), w_v, b_v))
        residual = x[:, :1] if self.last_residual == "cls" else x
        x = residual + block.ls_1(y)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    # -- text -------------------------------------------------------------------------------------------------
    def encode_text(self, class_names: list[str], batch_size: int = 2048) -> torch.Tensor:
        """Class names -> (N, P, C) L2-normalised embeddings, one per prompt template.

        A name with comma-separated synonyms averages their embeddings (synonyms="mean") or uses the first
        (synonyms="first", as the later release does).
        """
        tokens, owner, counts = self.prompt_tokens(class_names)
        feats = torch.cat([self.model.encode_text(tokens[i:i + batch_size], normalize=True)
                           for i in range(0, tokens.shape[0], batch_size)])
        feats = feats.view(-1, len(self.templates), feats.shape[-1])
        summed = feats.new_zeros(len(class_names), *feats.shape[1:]).index_add_(0, owner, feats)
        return F.normalize(summed / counts.view(-1, 1, 1), dim=-1)

    def prompt_tokens(self, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens of every synonym x template prompt, the class of each synonym, synonyms per class), on the
        model's device; cached for the last two vocabularies. Tokenizing is host work: a training step whose text
        tower trains encodes its vocabulary every step and would otherwise repeat it, and torch.compile cannot
        trace the tokenizer."""
        device = self.model.token_embedding.weight.device
        key = (tuple(class_names), str(device))
        hit = self._prompt_cache.get(key)
        if hit is None:
            synonyms = [split_synonyms(n) for n in class_names]
            if self.synonyms == "first":
                synonyms = [s[:1] for s in synonyms]
            prompts = [t.format(s) for syns in synonyms for s in syns for t in self.templates]
            # owner and counts built on the host: repeat_interleave on the device would wait for it to learn the
            # output size; outside inference mode, so that a training step can take them from the cache too
            with torch.inference_mode(False):
                hit = (self.tokenizer(prompts).to(device),
                       torch.tensor([i for i, syns in enumerate(synonyms) for _ in syns], device=device),
                       torch.tensor([len(s) for s in synonyms], device=device))
            self._prompt_cache[key] = hit
            while len(self._prompt_cache) > 2:
                self._prompt_cache.popitem(last=False)
        return hit

    # -- parameters -------------------------------------------------------------------------------------------
    def attention_parameter_names(self, tower: str = "visual") -> list[str]:
        """Names of the attention parameters of one tower ("visual" or "text")."""
        prefix = "model.visual.transformer." if tower == "visual" else "model.transformer."
        return [n for n, _ in self.named_parameters() if n.startswith(prefix) and ".attn." in n]

    def split_qkv(self) -> None:
        """Give every attention of both towers separate q/k/v projection weights (see split_qkv)."""
        for _, attn in attention_modules(self.model):
            split_qkv(attn)


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
