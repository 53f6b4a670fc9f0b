"""The CAT-Seg model: CLIP cost volume -> cost embedding -> N_B x (spatial, class aggregation) -> decoder."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .aggregation import AggregationLayer, ClassAggregation, GuidedSwinBlock, UpStage, cat_chunks, chunk_slices
from .clip import ClipEncoder, split_synonyms
from .config import CatSegConfig
from .ops import part, resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRUNED_LOGIT = -100.0  # logit given to classes removed by optional top-k pruning


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    # The guidance projections (P^V of Eq. 4 and the decoder's feature projections): the paper calls them linear
    # projections; the authors' code, whose released checkpoints these presets load, uses a 3x3 convolution and a
    # ReLU (and a linear layer with a ReLU for the text guidance P^L). The presets follow that code.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


class WindowAttentionSDPA(timm.models.swin_transformer.WindowAttention):
    """timm's Swin window attention through fused attention: the relative position bias and the shifted windows'
    mask join into one additive bias per (window, head) that broadcasts over the images, so neither the attention
    matrix nor a per-image copy of the mask is ever written (timm's own path computes the attention matrix with
    float32 softmax copies; its experimental fused path expands the mask over every image). Same function; the
    backbone's modules are switched to it (`use_fused_window_attention`). Where the bias would need a gradient (a
    trained backbone's training step), timm's path runs."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        table = self.relative_position_bias_table
        if torch.is_grad_enabled() and table.requires_grad or (self.training and self.attn_drop.p > 0):
            return super().forward(x, mask)
        b, n, _ = x.shape
        heads = self.num_heads
        windows = 1 if mask is None else mask.shape[0]
        q, k, v = self.qkv(x).view(b // windows, windows, n, 3, heads, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self._get_rel_pos_bias()  # (1, heads, n, n)
        if mask is not None:
            bias = bias + mask.unsqueeze(1).to(bias.dtype)  # (windows, heads, n, n)
        bias = bias.reshape(1, windows * heads, n, n).to(q.dtype)
        q, k, v = (t.reshape(b // windows, windows * heads, n, -1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(b, heads, n, -1).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))


def use_fused_window_attention(module: nn.Module, enable: bool = True) -> int:
    """Switch every timm Swin window attention inside `module` to `WindowAttentionSDPA` (or back); returns how many.
    Parameters, buffers and state dicts are unchanged."""
    base = timm.models.swin_transformer.WindowAttention
    count = 0
    for m in module.modules():
        if type(m) in (base, WindowAttentionSDPA):
            m.__class__ = WindowAttentionSDPA if enable else base
            count += 1
    return count


class TimmBackbone(nn.Module):
    """A timm feature extractor returning NCHW maps at strides 4, 8 and 16 (ImageNet normalisation applied)."""

    def __init__(self, cfg: CatSegConfig, weights: Optional[str] = None):
        super().__init__()
        kwargs = {}
        if weights not in (None, "download"):
            kwargs["pretrained_cfg_overlay"] = {"file": weights}
        if cfg.backbone_drop_path_rate is not None:
            kwargs["drop_path_rate"] = cfg.backbone_drop_path_rate
        try:
            self.body = timm.create_model(cfg.backbone_model, pretrained=weights is not None, features_only=True,
                                          out_indices=cfg.backbone_indices, **kwargs)
        except IndexError:  # a stage the model does not have
            stages = len(timm.create_model(cfg.backbone_model, pretrained=False, features_only=True).feature_info)
            raise ValueError(f"backbone_indices={cfg.backbone_indices} name a feature stage that {cfg.backbone_model} "
                             f"does not have; its stages are 0..{stages - 1}") from None
        use_fused_window_attention(self.body)  # a Swin body's windows through fused attention
        self.channels = list(self.body.feature_info.channels())
        self.nhwc = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self.channels_last = False  # convert the input to NHWC (see catseg.inference.backbone_channels_last)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels) if cfg.backbone_out_norm else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        if self.channels_last:  # a convolutional body then runs NHWC throughout (cuDNN's bf16 layout)
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.body(x)
        if self.out_norms is not None:  # LayerNorm over channels, taken channels-last
            feats = [n(f if self.nhwc else f.permute(0, 2, 3, 1)) for n, f in zip(self.out_norms, feats)]
            return [f.permute(0, 3, 1, 2) for f in feats]
        # NCHW out, also from a body stored channels-last (see catseg.inference.backbone_channels_last)
        return [f.permute(0, 3, 1, 2) for f in feats] if self.nhwc else [f.contiguous() for f in feats]


class ReleaseClassAggregation(ClassAggregation):
    """Class aggregation with the details of the authors' releases, each switchable (the class_* config fields).

    pool_eval: pool by `pool` in evaluation as well as in training. pooled_residual: the residual adds the pooled
    input together with the update, x + up(pool(x) + update), upsampled with aligned corners. guidance_norm /
    attention_proj: whether the text guidance is layer-normalised and the attention output projected.
    pad_to: fewer classes than this are padded with one learned token (and learned guidance) to exactly this many,
    so the linear attention's key/value summary always spans the same number of classes.
    """

    fuses_whole_block = False  # (its pooling, residual and padding variants): fused kernels for its MLP only

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, mlp_ratio: float, pool: int, *,
                 pool_eval: bool, pooled_residual: bool, guidance_norm: bool, attention_proj: bool, pad_to: int):
        super().__init__(dim, guidance_dim, num_heads, mlp_ratio, pool)
        self.pool_eval, self.pooled_residual, self.pad_to = pool_eval, pooled_residual, pad_to
        if not guidance_norm and self.guidance_norm is not None:
            self.guidance_norm = nn.Identity()
        if not attention_proj:
            self.proj = nn.Identity()
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim)) if pad_to else None
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_to and guidance_dim else None

    def _pooling(self) -> bool:
        return self.pool > 1 and (self.training or self.pool_eval)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self._pooling():
            b, n = x.shape[:2]
            x = F.avg_pool2d(x.flatten(0, 1), self.pool).unflatten(0, (b, n))
        return rearrange(x, "b n c h w -> b (h w) n c")

    def _residual(self, xs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.pooled_residual:
            return self._upsampled(xs, self._tokens(xs) + delta, True)
        return self._upsampled(xs, delta, False)

    def _upsampled(self, xs: torch.Tensor, update: torch.Tensor, align_corners: bool) -> torch.Tensor:
        b, n, c, h, w = xs.shape
        hp, wp = (h // self.pool, w // self.pool) if self._pooling() else (h, w)
        update = rearrange(update, "b (h w) n c -> (b n) c h w", h=hp, w=wp)
        if (hp, wp) != (h, w):
            update = F.interpolate(update, size=(h, w), mode="bilinear", align_corners=align_corners)
        return xs + update.unflatten(0, (b, n))

    def forward(self, xs, guidance: Optional[torch.Tensor], chunks: Sequence[slice]) -> list[torch.Tensor]:
        """As ClassAggregation's: xs[i] (B, n_i, C, H, W) holds the classes chunks[i] of guidance (N, G) or None."""
        n = chunks[-1].stop
        if self.padding_tokens is None or n >= self.pad_to:
            return super().forward(xs, guidance, chunks)
        # The padding classes join the key/value summary as one more chunk; their own outputs are dropped.
        b, _, c, h, w = xs[0].shape
        pad = self.pad_to - n
        padding = self.padding_tokens.to(xs[0].dtype).view(1, 1, c, 1, 1).expand(b, pad, c, h, w)
        if guidance is not None and self.padding_guidance is not None:
            guidance = torch.cat([guidance, self.padding_guidance[0].to(guidance.dtype).expand(pad, -1)], dim=0)
        return super().forward([*xs, padding], guidance, [*chunks, slice(n, self.pad_to)])[:-1]


def _uses_release_class_aggregation(cfg: CatSegConfig) -> bool:
    return (cfg.class_pool_eval or cfg.class_pooled_residual or not cfg.class_guidance_norm
            or not cfg.class_attention_proj or cfg.class_pad_to > 0)


class CatSeg(nn.Module):
    """Open-vocabulary segmentation: `model(images, class_names)` -> per-class logits.

    images: float (B, 3, S, S) RGB in [0, 1], S = `model.image_size` (normalisation happens inside).
    Returns logits (B, N, S/4, S/4) for the presets (4 x the cost grid: 96 x 96 for 384 inputs).
    """

    def __init__(self, cfg: CatSegConfig, backbone_weights: Optional[str] = None):
        super().__init__()
        self.config = cfg
        self.image_size = cfg.image_size
        self.clip = ClipEncoder(cfg)
        self.grid = self.clip.grid
        if self.grid % cfg.window_size and cfg.spatial_aggregation:
            raise ValueError(f"window_size={cfg.window_size} must divide the cost grid {self.grid} "
                             f"(clip_image_size {cfg.clip_image_size} / patch size)")
        clip_dim = self.clip.embed_dim
        num_templates = len(self.clip.templates)
        guided = cfg.embedding_guidance
        num_stages = len(cfg.decoder_dims) if cfg.upsampling_decoder else 0
        self.output_size = self.grid * 2 ** len(cfg.decoder_dims)

        # feature backbone: guidance at the cost grid, decoder features at 2x and 4x of it
        self.backbone: Optional[nn.Module] = None
        self.clip_upsamplers: Optional[nn.ModuleList] = None
        need_backbone = guided or num_stages > 0
        if cfg.backbone in ("resnet", "swin") and need_backbone:
            self.backbone = TimmBackbone(cfg, backbone_weights)
            guide_dim, dec_dims = self.backbone.channels[-1], self.backbone.channels[-2::-1]
        elif cfg.backbone == "clip" and need_backbone:
            width = self.clip.width
            self.clip_upsamplers = nn.ModuleList(
                nn.ConvTranspose2d(width, d, 2 ** (i + 1), stride=2 ** (i + 1))
                for i, d in enumerate(cfg.clip_guidance_upsample_dims))
            guide_dim, dec_dims = clip_dim, list(cfg.clip_guidance_upsample_dims)
        else:
            guide_dim, dec_dims = 0, [0] * len(cfg.decoder_dims)
        app_dim = cfg.appearance_guidance_dim if guided and guide_dim else 0
        text_dim = cfg.text_guidance_dim if guided else 0
        self.appearance_proj = _conv_relu(guide_dim, app_dim) if app_dim else None
        self.text_proj = nn.Sequential(nn.Linear(clip_dim, text_dim), nn.ReLU(inplace=True)) if text_dim else None

        d = cfg.embed_dim
        if cfg.aggregation == "cost":
            self.cost_embed = nn.Conv2d(num_templates, d, 7, padding=3)
        else:  # feature aggregation baseline: concatenated CLIP image and text features, projected
            self.cost_embed = nn.Conv2d(2 * clip_dim, d, 1)
        release = cfg.class_aggregation and _uses_release_class_aggregation(cfg)
        self.layers = nn.ModuleList(
            AggregationLayer(d, app_dim, text_dim, cfg.num_heads, cfg.window_size, cfg.mlp_ratio,
                             cfg.class_pool_train, cfg.spatial_aggregation, cfg.class_aggregation and not release)
            for _ in range(cfg.num_layers))
        if release:
            for layer in self.layers:
                layer.klass = ReleaseClassAggregation(
                    d, text_dim, cfg.num_heads, cfg.mlp_ratio, cfg.class_pool_train, pool_eval=cfg.class_pool_eval,
                    pooled_residual=cfg.class_pooled_residual, guidance_norm=cfg.class_guidance_norm,
                    attention_proj=cfg.class_attention_proj, pad_to=cfg.class_pad_to)

        if cfg.zero_init_residual:
            self._zero_init_residual_branches()

        self.decoder_proj = nn.ModuleList()
        self.decoder = nn.ModuleList()
        cin = d
        for i in range(num_stages):
            gdim = cfg.decoder_guidance_dims[i] if dec_dims[i] else 0
            self.decoder_proj.append(_conv_relu(dec_dims[i], gdim) if gdim else nn.Identity())
            self.decoder.append(UpStage(cin, cfg.decoder_dims[i], gdim, cfg.decoder_upsample))
            cin = cfg.decoder_dims[i]
        self.head = nn.Conv2d(cin, 1, 3, padding=1)

        self.check_inputs = True  # validate image range (one host sync); the trainer may switch it off
        self.cost_channels_last = False  # the cost volume NHWC (see catseg.inference.channels_last)
        self._text_cache: OrderedDict = OrderedDict()
        self._text_version = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_text_cache())
        self.set_clip_trainable(cfg.finetune)
        self.train()  # training mode as any new module, with a frozen-BatchNorm backbone's norms in eval mode

    def _zero_init_residual_branches(self) -> None:
        # Random aggregation blocks add large class-agnostic outputs to the small cosine-similarity signal and stall
        # early training; starting each block as the identity lets the cost reach the decoder from the first step.
        # Pretrained or loaded weights replace this initialisation.
        for module in self.layers.modules():
            if isinstance(module, GuidedSwinBlock):
                last = [module.attn.proj, module.mlp.fc2]
            elif isinstance(module, ClassAggregation):
                last = [module.proj if isinstance(module.proj, nn.Linear) else module.v, module.mlp.fc2]
            else:
                continue
            for linear in last:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    # -- text embeddings --------------------------------------------------------------------------------------
    def clear_text_cache(self) -> None:
        """Forget cached text embeddings (done when weights are loaded into the whole model; weights loaded into the
        text tower alone make later calls miss the cache, see `text_state`)."""
        self._text_cache.clear()
        self._text_version += 1

    def _text_tower_trains(self) -> bool:
        return any(p.requires_grad for p in self.clip.model.transformer.parameters())

    def text_state(self) -> tuple:
        """What the cached text embeddings depend on beyond the vocabulary: loads into the whole model and training
        (see `train`), weight loads that reached the text tower's modules (`model.clip.load_state_dict`,
        `catseg.clip.load_clip_weights`, ...; see `ClipEncoder.text_loads`), and in-place edits of the text tower's
        trainable parameters that bump their version counters. After editing a frozen text tower's weights in place,
        call `clear_text_cache`."""
        trained = tuple(p._version for p in self.clip.model.transformer.parameters() if p.requires_grad)
        return self._text_version, self.clip.text_loads(), trained

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """(N, P, C) normalised text embeddings; cached per vocabulary and text-tower state outside training."""
        if self.training and self._text_tower_trains():
            return self.clip.encode_text(list(class_names))
        device = self.clip.model.token_embedding.weight.device
        key = (tuple(class_names), str(device), self.text_state())
        hit = self._text_cache.get(key)
        if hit is None:  # computed in the weights' precision (fp32) also under autocast, and outside inference mode:
            # the cache serves every call, training's too
            with torch.no_grad(), torch.inference_mode(False), torch.autocast(device.type, enabled=False):
                hit = self.clip.encode_text(list(class_names)).float()
            self._text_cache[key] = hit
            while len(self._text_cache) > 8:
                self._text_cache.popitem(last=False)
        else:
            self._text_cache.move_to_end(key)
        return hit

    # -- forward ----------------------------------------------------------------------------------------------
    def validate(self, images: torch.Tensor, class_names: Sequence[str]) -> None:
        """Raise ValueError/TypeError with a clear message for inputs the model cannot take."""
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got "
                            f"{type(images).__name__}{'' if not torch.is_tensor(images) else ' ' + str(images.dtype)}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        s = self.image_size
        if tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"images must be {s}x{s} for preset {self.config.name!r}, got "
                             f"{images.shape[-2]}x{images.shape[-1]}; use catseg.inference for other sizes")
        if self.check_inputs and images.numel():
            lo, hi = torch.aminmax(images.detach())
            if not (lo.item() >= 0 and hi.item() <= 1):  # also catches NaN
                raise ValueError(f"image values must lie in [0, 1] (RGB / 255), got min {lo.item():.3g} max "
                                 f"{hi.item():.3g}")
        self.validate_class_names(class_names, self.config.synonyms)

    @staticmethod
    def validate_class_names(class_names: Sequence[str], synonyms: str | None = None) -> None:
        """Raise for a vocabulary the model cannot take: not a list of strings, empty, blank or duplicate names.

        Duplicates are names equal without case and runs of spaces (CLIP's tokenizer drops both), synonym for
        synonym; with `synonyms` "mean" (their embeddings averaged) also the same synonyms in any order. With "first"
        two names with one first synonym get one embedding too, but are let through: the later release's A-847
        list has nine such pairs ("bag", "pot", ...), and its evaluation runs them as they are."""
        if isinstance(class_names, str) or not isinstance(class_names, (list, tuple)):
            raise TypeError(f"class_names must be a list of strings, got {type(class_names).__name__}")
        if len(class_names) == 0:
            raise ValueError("class_names is empty; give at least one class name")
        bad = [n for n in class_names if not isinstance(n, str) or not split_synonyms(n)]
        if bad:
            raise ValueError(f"class names must be non-empty strings naming at least one class (not blank, not only "
                             f"commas), got {bad[:5]}")
        seen, dups = set(), []
        for n in class_names:
            parts = [" ".join(s.lower().split()) for s in split_synonyms(n)]
            key = frozenset(parts) if synonyms == "mean" else tuple(parts)
            (dups.append(n) if key in seen else seen.add(key))
        if dups:
            order = ", or synonym order" if synonyms == "mean" else ""
            raise ValueError(f"duplicate class names {sorted(set(dups))} (names are compared without case or "
                             f"spacing{order}); each class must appear once")

    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        self.validate(images, class_names)
        text = self.text_embeddings(class_names)
        with part("clip"):
            raw, taps = self.clip.encode_dense(images, normalize=False)
            dense = F.normalize(raw, dim=1)
        guide = dense if self.config.clip_guidance_normalized else raw
        with part("guidance backbone"):
            appearance, decoder_feats = self.guidance_features(images, guide, taps)
        return self.segment_features(dense, text, appearance, decoder_feats)

    def guidance_features(self, images, dense, taps) -> tuple[Optional[torch.Tensor], list]:
        """Backbone features: (projected appearance guidance at the cost grid, projected decoder features).

        With backbone "clip", `dense` (CLIP's dense features) is the appearance guidance and `taps` (its
        intermediate block outputs) feed the decoder.
        """
        g = self.grid
        if self.backbone is not None:
            feats = self.backbone(images)
            guide, dec = feats[-1], feats[-2::-1]
        elif self.clip_upsamplers is not None:
            guide, dec = dense, [up(t) for up, t in zip(self.clip_upsamplers, taps)]
        else:
            return None, [None] * len(self.decoder)
        sizes = [g * 2 ** (i + 1) for i in range(len(self.decoder))]
        dec = [None if isinstance(p, nn.Identity) else p(_resize(f, s))
               for p, f, s in zip(self.decoder_proj, dec, sizes)]
        appearance = self.appearance_proj(_resize(guide, g)) if self.appearance_proj is not None else None
        return appearance, dec

    def segment_features(self, dense, text, appearance, decoder_feats) -> torch.Tensor:
        """Cost volume -> aggregation -> decoder, classes in chunks of `config.class_chunk_size`."""
        k = self.config.top_k_classes
        if k is not None and text.shape[0] > k:
            return self._segment_top_k(dense, text, appearance, decoder_feats, k)
        return self._segment(dense, text, appearance, decoder_feats)

    def _segment(self, dense, text, appearance, decoder_feats) -> torch.Tensor:
        chunks = chunk_slices(text.shape[0], self.config.class_chunk_size)
        text_guidance = None
        if self.text_proj is not None:
            mean = text.mean(dim=1)
            text_guidance = self.text_proj(F.normalize(mean, dim=-1) if self.config.text_guidance_renormalize else mean)
        with part("cost embedding"):
            xs = [self.embed(dense, text[sl]) for sl in chunks]  # the classes stay in their chunks until the logits
        for layer in self.layers:
            xs = layer(xs, appearance, text_guidance, chunks)
        with part("decoder"):
            return cat_chunks([self.decode(x, decoder_feats) for x in xs])

    def _segment_top_k(self, dense, text, appearance, decoder_feats, k):
        # Per image, keep the k classes with the highest maximum cosine similarity over templates and pixels
        # (later-release option).
        with torch.no_grad():
            score = torch.einsum("bchw,npc->bnphw", dense.float(), text.float()).flatten(2).amax(dim=2)
            keep = score.topk(k, dim=1).indices.sort(dim=1).values
        outs = []
        for i in range(dense.shape[0]):
            logits = self._segment(dense[i:i + 1], text[keep[i]],
                                   None if appearance is None else appearance[i:i + 1],
                                   [None if f is None else f[i:i + 1] for f in decoder_feats])
            full = logits.new_full((1, text.shape[0], *logits.shape[-2:]), PRUNED_LOGIT)
            full[:, keep[i]] = logits
            outs.append(full)
        return torch.cat(outs)

    def embed(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cost volume (cosine similarity per template) and its embedding: (B, n, d_F, h, w)."""
        b, _, h, w = dense.shape
        n = text.shape[0]
        if self.config.aggregation == "cost":
            with torch.autocast(dense.device.type, enabled=False):
                if self.cost_channels_last:  # (b n, P, h, w) views of NHWC maps: the 7x7 convolution runs NHWC
                    cost = torch.einsum("bchw,npc->bnhwp", dense.float(), text.float()).flatten(0, 1)
                    cost = cost.permute(0, 3, 1, 2)
                else:
                    cost = torch.einsum("bchw,npc->bnphw", dense.float(), text.float()).flatten(0, 1)
            x = self.cost_embed(cost.to(self.cost_embed.weight.dtype))
        else:
            t = text.mean(dim=1).to(dense.dtype)
            feats = torch.cat([dense.unsqueeze(1).expand(b, n, -1, h, w),
                               t.view(1, n, -1, 1, 1).expand(b, n, -1, h, w)], dim=2)
            x = self.cost_embed(feats.flatten(0, 1))
        return x.unflatten(0, (b, n))

    def decode(self, x: torch.Tensor, decoder_feats: list) -> torch.Tensor:
        """Upsampling decoder and per-class head: (B, n, d, h, w) -> (B, n, 4h, 4w) logits."""
        b, n = x.shape[:2]
        y = x.flatten(0, 1)
        for stage, feat in zip(self.decoder, decoder_feats):
            y = stage(y, feat)
        y = self.head(y)
        if y.shape[-1] != self.output_size:
            y = resize(y, (self.output_size, self.output_size))
        return y.view(b, n, *y.shape[-2:])

    # -- training helpers -------------------------------------------------------------------------------------
    def set_clip_trainable(self, mode: str) -> None:
        """Choose which CLIP parameters train.

        attention: the visual attention layers (q/k/v in-projection and out-projection) and the visual positional
                   embedding (the paper's efficient fine-tuning); frozen: no CLIP parameter; full: the whole image
                   encoder. The text tower is frozen in these three modes.
        qv: the query and value projection weights of every attention of both towers (the later release; not the
            query of the last visual block, which the dense features do not use); the
            fused q/k/v weights are split into separate parameters first (attn.{q,k,v}_proj_weight), so call this
            before building an optimizer. The key weights, biases and out-projections stay frozen.
        """
        allowed = ("attention", "frozen", "full", "qv")
        if mode not in allowed:
            raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of: {', '.join(allowed)}")
        if mode == "qv":
            self.clip.split_qkv()
        # The last visual block keeps only its value path (no token mixing): its query projection is never used.
        last = len(self.clip.model.visual.transformer.resblocks) - 1
        unused_query = f"model.visual.transformer.resblocks.{last}.attn.q_proj_weight"
        for name, p in self.clip.named_parameters():
            visual = name.startswith("model.visual.")
            if mode == "full":
                p.requires_grad_(visual)
            elif mode == "attention":
                p.requires_grad_(visual and (".attn." in name or name == "model.visual.positional_embedding"))
            elif mode == "qv":
                p.requires_grad_(name.endswith((".attn.q_proj_weight", ".attn.v_proj_weight")) and name != unused_query)
            else:
                p.requires_grad_(False)
        if self.backbone is not None:
            self.backbone.requires_grad_(not self.config.backbone_frozen)
            for bn in self._frozen_batch_norms():
                bn.requires_grad_(False)
        self.finetune_mode = mode

    def _frozen_batch_norms(self) -> list[nn.Module]:
        if self.backbone is None or not self.config.backbone_frozen_bn:
            return []
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "CatSeg":
        """As nn.Module.train; a frozen-BatchNorm backbone's norms stay in eval mode (see `backbone_frozen_bn`).
        Leaving training forgets the cached text embeddings when the text tower trains: optimizers change weights
        in ways the cache key cannot see (fused AdamW and DeepSpeed leave the tensors' version counters alone)."""
        if self.training and not mode and self._text_tower_trains():
            self.clear_text_cache()
        super().train(mode)
        for bn in self._frozen_batch_norms():
            bn.eval()
        return self

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that receive gradients."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters split into "clip", "backbone" and "head" (for separate learning rates)."""
        groups: dict[str, list] = {"clip": [], "backbone": [], "head": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            key = "clip" if name.startswith("clip.") else "backbone" if name.startswith("backbone.") else "head"
            groups[key].append((name, p))
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute CLIP blocks and spatial aggregation in the backward pass to save activation memory."""
        self.clip.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return resize(x, (size, size))

