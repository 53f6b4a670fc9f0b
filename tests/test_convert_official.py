"""Importing the authors' released checkpoints: a synthetic detectron2 checkpoint with the release's key names and
layouts converts, loads, reproduces our model exactly and matches an independent implementation of the release's
computation on its own tensors; extra, missing and malicious content is refused."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import catseg
from catseg.clip import CLIP_MEAN, CLIP_STD
from catseg.convert_official import ConversionError, convert, load_detectron2_checkpoint, main
from catseg.presets import get_config

ROOT = Path(__file__).resolve().parents[1]
CLIP = "sem_seg_head.predictor.clip_model."
AGG = "sem_seg_head.predictor.transformer."
VOCAB = ["cat", "dog, puppy", "tree", "sky, heaven", "road"]


# -- a release checkpoint built from our parameters, names mapped backwards ----------------------------------------
def to_release_name(key: str) -> str:
    """Our parameter name -> the name the authors' detectron2 model gives it."""
    if key.startswith("clip.model."):
        return CLIP + key[len("clip.model."):]
    m = re.fullmatch(r"clip_upsamplers\.(\d)\.(\w+)", key)
    if m:
        return f"upsample{int(m[1]) + 1}.{m[2]}"
    simple = {"cost_embed": "conv1", "appearance_proj.0": "guidance_projection.0",
              "text_proj.0": "text_guidance_projection.0", "head": "head"}
    stem, leaf = key.rsplit(".", 1)
    if stem in simple:
        return f"{AGG}{simple[stem]}.{leaf}"
    for pattern, repl in [
        (r"decoder_proj\.(\d)\.0\.(\w+)", lambda m: f"decoder_guidance_projection.{m[1]}.0.{m[2]}"),
        (r"decoder\.(\d)\.up\.(\w+)", lambda m: f"decoder{int(m[1]) + 1}.up.{m[2]}"),
        (r"decoder\.(\d)\.conv\.(\d)\.(\w+)", lambda m: f"decoder{int(m[1]) + 1}.conv.double_conv.{m[2]}.{m[3]}"),
        (r"layers\.(\d)\.spatial\.blocks\.(\d)\.(.+)",
         lambda m: f"layers.{m[1]}.swin_block.block_{int(m[2]) + 1}.{m[3]}"),
        (r"layers\.(\d)\.spatial\.guidance_norm\.(\w+)", lambda m: f"layers.{m[1]}.swin_block.guidance_norm.{m[2]}"),
        (r"layers\.(\d)\.klass\.([qkv])\.(\w+)", lambda m: f"layers.{m[1]}.attention.attention.{m[2]}.{m[3]}"),
        (r"layers\.(\d)\.klass\.mlp\.fc1\.(\w+)", lambda m: f"layers.{m[1]}.attention.MLP.0.{m[2]}"),
        (r"layers\.(\d)\.klass\.mlp\.fc2\.(\w+)", lambda m: f"layers.{m[1]}.attention.MLP.2.{m[2]}"),
        (r"layers\.(\d)\.klass\.(norm\d)\.(\w+)", lambda m: f"layers.{m[1]}.attention.{m[2]}.{m[3]}"),
        (r"layers\.(\d)\.klass\.(padding_\w+)", lambda m: f"layers.{m[1]}.attention.{m[2]}"),
    ]:
        m = re.fullmatch(pattern, key)
        if m:
            return AGG + repl(m)
    raise AssertionError(f"test mapping lacks {key}")


def random_model(seed=0, **overrides):
    """catseg2_tiny with every parameter random (norms and padding tokens included), in evaluation mode."""
    torch.manual_seed(seed)
    model = catseg.create_model("catseg2_tiny", **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 0.2) + (1.0 if name.endswith("norm1.weight") else 0))
    return model


def release_state(model, pos_grid=None):
    """The release's state dict for our model; the CLIP positional embedding optionally at a native grid."""
    state = {to_release_name(k): v.detach().clone() for k, v in model.state_dict().items()}
    assert not any(k.endswith("in_proj_weight") for k in state)  # the release splits q/k/v, as our qv mode does
    if pos_grid is not None:
        g = torch.Generator().manual_seed(7)
        state[CLIP + "visual.positional_embedding"] = torch.randn(pos_grid * pos_grid + 1, 64, generator=g) * 0.1
    for i in range(model.config.num_layers):  # the shifted-window mask is a stored buffer in the release
        state[f"{AGG}layers.{i}.swin_block.block_2.attn_mask"] = torch.zeros(4, 16, 16)
    return state


def save_release(state, path, numpy_keys=()):
    """A detectron2-style checkpoint: state dict under 'model' (some tensors as NumPy arrays), plus bookkeeping."""
    model = {k: (v.numpy() if k in numpy_keys else v) for k, v in state.items()}
    torch.save({"model": model, "iteration": np.int64(79999), "__author__": "catseg"}, path)
    return path


# -- the release's computation, written from its description, on the release's own tensors -------------------------
def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], 1e-5)


def _mha(x, sd, key, heads, mask=None):
    """Multi-head self-attention on (L, B, D) with the release's separate q/k/v weights and fused bias."""
    length, b, d = x.shape
    bias = sd[key + ".in_proj_bias"].chunk(3)
    q, k, v = (F.linear(x, sd[f"{key}.{c}_proj_weight"], bb) for c, bb in zip("qkv", bias))
    q, k, v = (t.reshape(length, b * heads, d // heads).transpose(0, 1) for t in (q, k, v))
    logits = q @ k.transpose(1, 2) / (d // heads) ** 0.5
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(length, b, d)
    return F.linear(out, sd[key + ".out_proj.weight"], sd[key + ".out_proj.bias"])


def _mlp(x, sd, key, act):
    return F.linear(act(F.linear(x, sd[key + ".c_fc.weight"], sd[key + ".c_fc.bias"])),
                    sd[key + ".c_proj.weight"], sd[key + ".c_proj.bias"])


def release_clip_image(sd, images255, cfg, act):
    """Dense CLIP features (B, 1 + g*g, C) and the outputs of the tapped blocks (L, B, W), as the release runs."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255, torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    x = F.interpolate((images255 - mean) / std, size=(cfg.clip_image_size,) * 2, mode="bilinear",
                      align_corners=False)
    w = sd[CLIP + "visual.conv1.weight"]
    x = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[CLIP + "visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    pos = sd[CLIP + "visual.positional_embedding"]
    if pos.shape[0] != x.shape[1]:  # the release resizes its native-grid embedding on every call
        g, new = round((pos.shape[0] - 1) ** 0.5), round((x.shape[1] - 1) ** 0.5)
        grid = F.interpolate(pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(new, new), mode="bicubic",
                             align_corners=False)
        pos = torch.cat([pos[:1], grid[0].reshape(pos.shape[1], -1).T])
    x = _ln(x + pos, sd, CLIP + "visual.ln_pre").transpose(0, 1)
    depth = len({k.split(".")[6] for k in sd if k.startswith(CLIP + "visual.transformer.resblocks.")})
    heads = x.shape[-1] // cfg.clip_cfg["vision_cfg"]["head_width"]
    taps = []
    for i in range(depth):
        blk = f"{CLIP}visual.transformer.resblocks.{i}"
        if i < depth - 1:
            x = x + _mha(_ln(x, sd, blk + ".ln_1"), sd, blk + ".attn", heads)
            x = x + _mlp(_ln(x, sd, blk + ".ln_2"), sd, blk + ".mlp", act)
            if i + 1 in cfg.clip_guidance_layers:
                taps.append(x)
        else:  # value path for every token, CLS token as the residual, then the block's MLP
            y = _ln(x, sd, blk + ".ln_1")
            v = F.linear(y, sd[blk + ".attn.v_proj_weight"], sd[blk + ".attn.in_proj_bias"].chunk(3)[2])
            v = F.linear(v, sd[blk + ".attn.out_proj.weight"], sd[blk + ".attn.out_proj.bias"]) + x[:1]
            x = v + _mlp(_ln(v, sd, blk + ".ln_2"), sd, blk + ".mlp", act)
    x = _ln(x.transpose(0, 1), sd, CLIP + "visual.ln_post")
    return x @ sd[CLIP + "visual.proj"], taps


def release_clip_text(sd, model, names):
    """(T, 1, C) normalised embeddings of the single template with each name's first synonym."""
    prompts = [model.clip.templates[0].format(n.split(", ")[0]) for n in names]
    tokens = model.clip.tokenizer(prompts)
    x = sd[CLIP + "token_embedding.weight"][tokens] + sd[CLIP + "positional_embedding"]
    x = x.transpose(0, 1)
    length = x.shape[0]
    mask = torch.full((length, length), float("-inf")).triu(1)
    heads = model.config.clip_cfg["text_cfg"]["heads"]
    depth = len({k.split(".")[5] for k in sd if k.startswith(CLIP + "transformer.resblocks.")})
    act = F.gelu if not model.config.clip_quick_gelu else (lambda t: t * torch.sigmoid(1.702 * t))
    for i in range(depth):
        blk = f"{CLIP}transformer.resblocks.{i}"
        x = x + _mha(_ln(x, sd, blk + ".ln_1"), sd, blk + ".attn", heads, mask)
        x = x + _mlp(_ln(x, sd, blk + ".ln_2"), sd, blk + ".mlp", act)
    x = _ln(x.transpose(0, 1), sd, CLIP + "ln_final")
    x = x[torch.arange(len(names)), tokens.argmax(-1)] @ sd[CLIP + "text_projection"]
    return F.normalize(x, dim=-1).unsqueeze(1)


def _swin_block(x, guidance, sd, key, h, w, window, shift, heads):
    """(BT, HW, C) -> same; guidance (BT, HW, G) concatenated to the query/key inputs after norm1."""
    bt, _, c = x.shape
    y = torch.cat([_ln(x, sd, key + ".norm1").view(bt, h, w, c), guidance.view(bt, h, w, -1)], dim=-1)
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
    win = y.view(bt, h // window, window, w // window, window, -1).permute(0, 1, 3, 2, 4, 5)
    win = win.reshape(-1, window * window, y.shape[-1])
    q = F.linear(win, sd[key + ".attn.q.weight"], sd[key + ".attn.q.bias"])
    k = F.linear(win, sd[key + ".attn.k.weight"], sd[key + ".attn.k.bias"])
    v = F.linear(win[..., :c], sd[key + ".attn.v.weight"], sd[key + ".attn.v.bias"])
    q, k, v = (t.view(t.shape[0], -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    logits = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    if shift:
        region = torch.zeros(1, h, w, 1)
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for n, (hs, ws) in enumerate((a, b) for a in cuts for b in cuts):
            region[:, hs, ws] = n
        ids = region.view(1, h // window, window, w // window, window).permute(0, 1, 3, 2, 4).reshape(-1, window ** 2)
        mask = (ids[:, None, :] != ids[:, :, None]).float() * -100.0
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, heads, window ** 2, window ** 2) + mask[None, :, None]).flatten(0, 1)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, window * window, c)
    out = F.linear(out, sd[key + ".attn.proj.weight"], sd[key + ".attn.proj.bias"])
    out = out.view(bt, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(bt, h, w, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out.reshape(bt, h * w, c)
    hidden = F.gelu(F.linear(_ln(x, sd, key + ".norm2"), sd[key + ".mlp.fc1.weight"], sd[key + ".mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[key + ".mlp.fc2.weight"], sd[key + ".mlp.fc2.bias"])


def _class_layer(x, guidance, sd, key, pool, pad_len, heads):
    """x (B, C, T, H, W), guidance (B, T, G): pooled linear attention over (padded) classes, pooled residual."""
    b, c, t, h, w = x.shape
    xp = F.avg_pool2d(x.permute(0, 2, 1, 3, 4).flatten(0, 1), pool).unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)
    hp, wp = xp.shape[-2:]
    if t < pad_len:
        xp = torch.cat([xp, sd[key + ".padding_tokens"].view(1, c, 1, 1, 1).expand(b, c, pad_len - t, hp, wp)], 2)
        guidance = torch.cat([guidance, sd[key + ".padding_guidance"].expand(b, pad_len - t, -1)], dim=1)
    tokens = xp.permute(0, 3, 4, 2, 1).reshape(b * hp * wp, -1, c)
    g = guidance.repeat_interleave(hp * wp, dim=0)
    y = _ln(tokens, sd, key + ".norm1")
    q = F.linear(torch.cat([y, g], -1), sd[key + ".attention.q.weight"], sd[key + ".attention.q.bias"])
    k = F.linear(torch.cat([y, g], -1), sd[key + ".attention.k.weight"], sd[key + ".attention.k.bias"])
    v = F.linear(y, sd[key + ".attention.v.weight"], sd[key + ".attention.v.bias"])
    q, k, v = (z.view(z.shape[0], z.shape[1], heads, -1) for z in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("nshd,nshv->nhdv", k, v)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(1)) + 1e-6)
    tokens = tokens + torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z).flatten(2)
    hidden = F.relu(F.linear(_ln(tokens, sd, key + ".norm2"), sd[key + ".MLP.0.weight"], sd[key + ".MLP.0.bias"]))
    tokens = tokens + F.linear(hidden, sd[key + ".MLP.2.weight"], sd[key + ".MLP.2.bias"])
    up = tokens.view(b, hp, wp, -1, c).permute(0, 3, 4, 1, 2).flatten(0, 1)
    up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=True).unflatten(0, (b, -1))
    return x + up[:, :t].permute(0, 2, 1, 3, 4)


def _up(x, guidance, sd, key):
    w = sd[key + ".up.weight"]
    x = F.conv_transpose2d(x, w, sd[key + ".up.bias"], stride=2)
    x = torch.cat([x, guidance.repeat_interleave(x.shape[0] // guidance.shape[0], dim=0)], dim=1)
    for i in (0, 3):
        x = F.conv2d(x, sd[f"{key}.conv.double_conv.{i}.weight"], padding=1)
        gn = f"{key}.conv.double_conv.{i + 1}"
        groups = max(1, sd[gn + ".weight"].numel() // 16)  # the release's width // 16 (>= 16 wide there)
        x = F.relu(F.group_norm(x, groups, sd[gn + ".weight"], sd[gn + ".bias"]))
    return x


def release_forward(sd, model, images01, names):
    """The release's logits (B, T, 4g, 4g) for images in [0, 1], computed on its own state dict."""
    cfg = model.config
    act = F.gelu if not cfg.clip_quick_gelu else (lambda t: t * torch.sigmoid(1.702 * t))
    feats, taps = release_clip_image(sd, images01 * 255, cfg, act)
    g = model.grid
    img = feats[:, 1:].transpose(1, 2).reshape(feats.shape[0], -1, g, g)  # raw, as the appearance guidance
    res4 = F.conv_transpose2d(taps[0][1:].permute(1, 2, 0).reshape(img.shape[0], -1, g, g), sd["upsample1.weight"],
                              sd["upsample1.bias"], stride=2)
    res5 = F.conv_transpose2d(taps[1][1:].permute(1, 2, 0).reshape(img.shape[0], -1, g, g), sd["upsample2.weight"],
                              sd["upsample2.bias"], stride=4)
    text = release_clip_text(sd, model, names).unsqueeze(0).expand(img.shape[0], -1, -1, -1)  # B T P C
    b, t = text.shape[:2]
    pad_len = cfg.class_pad_to
    corr = torch.einsum("bchw,btpc->bpthw", F.normalize(img, dim=1), F.normalize(text, dim=-1))
    classes = None
    if pad_len and t > pad_len:  # the release keeps the pad_len classes with the highest maximum similarity
        classes = corr.permute(0, 2, 1, 3, 4).flatten(2).max(-1)[0].topk(pad_len, dim=-1, sorted=False)[1]
        text = torch.gather(text, 1, classes[..., None, None].expand(-1, -1, *text.shape[2:]))
        corr = torch.einsum("bchw,btpc->bpthw", F.normalize(img, dim=1), text)
    x = F.conv2d(corr.permute(0, 2, 1, 3, 4).flatten(0, 1), sd[AGG + "conv1.weight"], sd[AGG + "conv1.bias"],
                 padding=3)
    x = x.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)  # B C T H W
    conv_relu = lambda z, k: F.relu(F.conv2d(z, sd[k + ".weight"], sd[k + ".bias"], padding=1))
    app = conv_relu(img, AGG + "guidance_projection.0")
    dec = [conv_relu(res4, AGG + "decoder_guidance_projection.0.0"),
           conv_relu(res5, AGG + "decoder_guidance_projection.1.0")]
    tg = F.normalize(text.mean(-2), dim=-1)
    proj = AGG + "text_guidance_projection.0"
    tg = F.relu(F.linear(tg, sd[proj + ".weight"], sd[proj + ".bias"]))
    heads, window = cfg.num_heads, cfg.window_size
    for i in range(cfg.num_layers):
        key = f"{AGG}layers.{i}"
        c, tt = x.shape[1], x.shape[2]
        y = x.permute(0, 2, 3, 4, 1).reshape(b * tt, g * g, c)
        guide = app.permute(0, 2, 3, 1).reshape(b, 1, g * g, -1).expand(-1, tt, -1, -1).flatten(0, 1)
        guide = _ln(guide, sd, key + ".swin_block.guidance_norm")
        y = _swin_block(y, guide, sd, key + ".swin_block.block_1", g, g, window, 0, heads)
        y = _swin_block(y, guide, sd, key + ".swin_block.block_2", g, g, window, window // 2, heads)
        x = y.view(b, tt, g, g, c).permute(0, 4, 1, 2, 3)
        # the release evaluates with POOLING_SIZES [1, 1] (its eval.sh); its config's [2, 2] = class_pool_eval
        pool = cfg.class_pool_train if cfg.class_pool_eval else 1
        x = _class_layer(x, tg, sd, key + ".attention", pool, pad_len, heads)
    y = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    y = _up(y, dec[0], sd, AGG + "decoder1")
    y = _up(y, dec[1], sd, AGG + "decoder2")
    logits = F.conv2d(y, sd[AGG + "head.weight"], sd[AGG + "head.bias"], padding=1).view(b, -1, *y.shape[-2:])
    if classes is not None:
        out = torch.full((b, t, *logits.shape[-2:]), -100.0)
        out.scatter_(1, classes[..., None, None].expand(-1, -1, *logits.shape[-2:]), logits)
        logits = out
    return logits


def images(b=2, seed=0, size=128):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- tests ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source():
    return random_model(seed=0)


@pytest.mark.parametrize("pool_eval", [False, True])
def test_converted_release_matches_the_release_computation(source, tmp_path, pool_eval):
    """Positional embedding at a smaller native grid, NumPy entries, derived buffers: via the real CLI.

    pool_eval: the release evaluated as its eval.sh does (no class pooling) or with its config's 2x2 pooling.
    """
    state = release_state(source, pos_grid=4)
    ckpt = save_release(state, tmp_path / "model_final.pth",
                        numpy_keys=[CLIP + "visual.proj", AGG + "head.weight", "upsample1.bias"])
    out = tmp_path / "w.safetensors"
    if pool_eval:
        convert(ckpt, "catseg2_tiny", out)
    else:  # once through the command line in its own process
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-m", "catseg.convert_official", str(ckpt), "--preset",
                              "catseg2_tiny", "--out", str(out)], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "wrote" in run.stderr and out.is_file()
    model = catseg.create_model("catseg2_tiny", pretrained=str(out), class_pool_eval=pool_eval).eval()
    x = images()
    with torch.no_grad():
        ours = model(x, VOCAB)
        theirs = release_forward(state, model, x, VOCAB)
    assert ours.shape == theirs.shape == (2, 5, 32, 32)
    assert theirs.abs().max() > 1  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the positional embedding was resized once at conversion, as the release does at every call
    pos = model.clip.model.visual.positional_embedding
    native = state[CLIP + "visual.positional_embedding"]
    grid = F.interpolate(native[1:].T.reshape(1, 64, 4, 4), size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos, torch.cat([native[:1], grid.reshape(64, 64).T]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pool_eval", [False, True])
def test_release_computation_on_features_that_vary_over_the_image(source, tmp_path, monkeypatch, pool_eval):
    """The comparison above with CLIP's outputs replaced by random tensors that vary from token to token: a random
    CLIP's token features nearly coincide (cosine > 0.999), which hides anything that depends on where a token lies
    (the shift of the second Swin block, the guidance rolled with it, the pooled residual's alignment)."""
    out = convert(save_release(release_state(source), tmp_path / "m.pth"), "catseg2_tiny", tmp_path / "w.safetensors")
    state = release_state(source)
    model = catseg.create_model("catseg2_tiny", pretrained=str(out), class_pool_eval=pool_eval).eval()
    g, b, width = model.grid, 2, 64
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(b, 1 + g * g, width, generator=gen)
    taps = [torch.randn(1 + g * g, b, width, generator=gen) for _ in range(2)]
    monkeypatch.setattr(sys.modules[__name__], "release_clip_image", lambda *a, **k: (feats, taps))
    dense = feats[:, 1:].transpose(1, 2).reshape(b, width, g, g)
    our_taps = [t[1:].permute(1, 2, 0).reshape(b, width, g, g) for t in taps]
    monkeypatch.setattr(model.clip, "encode_dense", lambda x, normalize=True: (dense, our_taps))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x, VOCAB), release_forward(state, model, x, VOCAB), rtol=1e-4, atol=1e-4)


def test_dense_clip_features_match_the_release_token_by_token(source):
    """Dense CLIP features against the release's computation with the part all tokens share removed (a random
    CLIP's tokens nearly coincide): which token lies where, the last block's residual, the CLS token dropped."""
    x = images()
    with torch.no_grad():
        ours, _ = source.clip.encode_dense(x, normalize=False)
        theirs, _ = release_clip_image(release_state(source), x * 255, source.config, F.gelu)
    theirs = theirs[:, 1:].transpose(1, 2).reshape(ours.shape)

    def centre(t):
        return t - t.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(centre(ours), centre(theirs), rtol=1e-3, atol=1e-5 * ours.abs().max().item())


def test_top_k_pruning_matches_the_release(source, tmp_path):
    """More classes than the padding length: with top_k_classes = class_pad_to our model prunes as the release."""
    state = release_state(source)
    out = convert(save_release(state, tmp_path / "m.pth"), "catseg2_tiny", tmp_path / "w.safetensors")
    model = catseg.create_model("catseg2_tiny", pretrained=str(out), top_k_classes=12).eval()
    vocab = [f"thing {i}" for i in range(15)]
    x = images(seed=3)
    with torch.no_grad():
        ours, theirs = model(x, vocab), release_forward(state, model, x, vocab)
    assert ((theirs == -100).flatten(2).all(-1).sum(1) == 3).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_roundtrip_reproduces_our_model_exactly(source, tmp_path):
    ckpt = save_release(release_state(source), tmp_path / "model_base.pth", numpy_keys=[CLIP + "logit_scale"])
    out = convert(ckpt, "catseg2_tiny", tmp_path / "w.safetensors")
    loaded = catseg.create_model("catseg2_tiny", pretrained=str(out)).eval()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = images(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, VOCAB), source(x, VOCAB), rtol=0, atol=0)
    torch.save(release_state(source), tmp_path / "bare.pth")  # a state dict without detectron2's 'model' wrapper
    bare = convert(tmp_path / "bare.pth", "catseg2_tiny", tmp_path / "bare.safetensors")
    assert catseg.weights.read_preset(bare) == "catseg2_tiny"


def test_extra_missing_and_misshapen_keys_are_listed(source, tmp_path, capsys):
    state = release_state(source)
    state["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    del state[AGG + "layers.1.attention.padding_tokens"]
    del state[CLIP + "visual.transformer.resblocks.0.attn.k_proj_weight"]
    state[AGG + "head.bias"] = torch.zeros(2)
    ckpt = save_release(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as info:
        convert(ckpt, "catseg2_tiny", tmp_path / "w.safetensors")
    message = str(info.value)
    assert "sem_seg_head.predictor.extra_head.weight" in message
    assert "layers.1.klass.padding_tokens" in message
    assert "clip.model.visual.transformer.resblocks.0.attn.k_proj_weight" in message
    assert "head.bias: checkpoint (2,), preset (1,)" in message
    assert not (tmp_path / "w.safetensors").exists()
    assert main([str(ckpt), "--preset", "catseg2_tiny", "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "missing from the checkpoint" in capsys.readouterr().err


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_detectron2_checkpoint(path)
    assert main([str(path), "--preset", "catseg2_tiny", "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists()


def test_bad_files_and_presets(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_detectron2_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_detectron2_checkpoint(tmp_path / "text.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="under 'model'.*state_dict"):
        load_detectron2_checkpoint(tmp_path / "other.pth")
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match="choose one of: .*catseg2_vitb16.*catseg2_vitl14"):
        convert(tmp_path / "m.pth", "catseg2_vitx", tmp_path / "w.safetensors")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "m.pth"), "--preset", "catseg2_tiny", "--out", str(tmp_path / "w.pt")])
    assert "must end in .safetensors" in capsys.readouterr().err


def test_release_pixel_buffers_are_checked(source, tmp_path):
    state = release_state(source)
    state["clip_pixel_mean"] = torch.tensor([122.7709383, 116.7460125, 104.09373615])
    state["pixel_std"] = torch.tensor([58.395, 57.120, 57.375])
    convert(save_release(state, tmp_path / "ok.pth"), "catseg2_tiny", tmp_path / "ok.safetensors")
    state["clip_pixel_std"] = torch.tensor([1.0, 1.0, 1.0])
    with pytest.raises(ConversionError, match="clip_pixel_std"):
        convert(save_release(state, tmp_path / "bad.pth"), "catseg2_tiny", tmp_path / "bad.safetensors")


def test_fused_release_layout_loads_into_split_preset(source, tmp_path):
    """A checkpoint holding fused in_proj_weight tensors (open_clip/OpenAI layout) converts to the split layout."""
    state = release_state(source)
    for key in [k for k in state if k.endswith(".attn.q_proj_weight")]:
        stem = key[: -len("q_proj_weight")]
        state[stem + "in_proj_weight"] = torch.cat([state.pop(stem + f"{c}_proj_weight") for c in "qkv"])
    out = convert(save_release(state, tmp_path / "fused.pth"), "catseg2_tiny", tmp_path / "w.safetensors")
    loaded = catseg.create_model("catseg2_tiny", pretrained=str(out)).eval()
    x = images(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, VOCAB), source(x, VOCAB), rtol=0, atol=0)


def test_real_presets_have_release_shapes():
    """The catseg2 presets hold exactly the tensors (names and shapes) the release's ViT-B and ViT-L models hold."""
    for name, width, embed, taps in [("catseg2_vitb16", 768, 512, (4, 8)), ("catseg2_vitl14", 1024, 768, (8, 16))]:
        with torch.device("meta"):
            model = catseg.create_model(name)
        sd = model.state_dict()
        assert sd["clip_upsamplers.0.weight"].shape == (width, 256, 2, 2)
        assert sd["clip_upsamplers.1.weight"].shape == (width, 128, 4, 4)
        assert sd["appearance_proj.0.weight"].shape == (128, embed, 3, 3)
        assert sd["text_proj.0.weight"].shape == (128, embed)
        assert sd["cost_embed.weight"].shape == (128, 1, 7, 7)
        assert sd["layers.0.klass.padding_tokens"].shape == (1, 1, 128)
        assert sd["decoder.0.up.weight"].shape == (128, 96, 2, 2) and sd["decoder.1.up.weight"].shape == (64, 48, 2, 2)
        assert model.grid == 24 and model.output_size == 96 and get_config(name).clip_guidance_layers == taps
        assert not any(k.endswith("in_proj_weight") for k in sd)
        names = {to_release_name(k) for k in sd}
        assert len(names) == len(sd)


# -- the paper design's release (detectron2 ResNet / Swin backbones, fused CLIP q/k/v) ------------------------------
def to_paper_release_name(key: str):
    """Our name -> the paper release's name (None: bookkeeping the release does not store)."""
    if key.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"backbone\.body\.(conv1\.weight|bn1\.(\w+))", key)
    if m:
        return "backbone.stem.conv1.weight" if m[2] is None else f"backbone.stem.conv1.norm.{m[2]}"
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", key)
    if m:
        return f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[4]}." + ("weight" if m[3] == "conv" else f"norm.{m[5]}")
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", key)
    if m:
        return f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut." + ("weight" if m[3] == "0" else f"norm.{m[4]}")
    m = re.fullmatch(r"backbone\.body\.layers_(\d)\.(blocks\..+)", key)
    if m:
        return f"backbone.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"backbone\.body\.layers_(\d)\.downsample\.(.+)", key)
    if m:
        return f"backbone.layers.{int(m[1]) - 1}.downsample.{m[2]}"
    m = re.fullmatch(r"backbone\.(body\.patch_embed|out_norms)\.(.+)", key)
    if m:
        return f"backbone.patch_embed.{m[2]}" if m[1] == "body.patch_embed" else f"backbone.norm{m[2]}"
    return to_release_name(key)


def paper_release_state(state):
    out = {}
    for k, v in state.items():
        name = to_paper_release_name(k)
        if name is not None:
            out[name] = v
        if ".blocks." in k and k.endswith("attn.relative_position_bias_table"):  # a buffer the release stores
            out[name.replace("bias_table", "index")] = torch.zeros(144, 144, dtype=torch.long, device=v.device)
    return out


def test_paper_release_with_resnet_converts_and_reproduces_the_model():
    from catseg.convert_official import PAPER_RULES, convert_state_dict
    from catseg.presets import _PAPER_RELEASE

    torch.manual_seed(4)
    overrides = dict(_PAPER_RELEASE, backbone_model="resnet18")  # basic blocks: detectron2's R18 naming
    source = catseg.create_model("catseg_tiny", **overrides).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in source.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    state = paper_release_state(source.state_dict())
    assert "backbone.res3.0.shortcut.norm.running_mean" in state and "backbone.stem.conv1.norm.weight" in state
    fresh = catseg.create_model("catseg_tiny", **overrides).eval()
    fresh.load_state_dict(convert_state_dict(state, PAPER_RULES, fresh.state_dict()))
    x = images(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, VOCAB), source(x, VOCAB), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["catseg_vitb16_r101", "catseg_vitl14_swinb"])
def test_paper_release_names_cover_the_full_presets(preset):
    """Every tensor of the real ResNet-101 / Swin-B release variants maps from the release's names (meta tensors)."""
    from catseg.convert_official import convert_state_dict, rules_for, target_preset

    name = target_preset(preset)
    assert name == f"{preset}_release"
    with torch.device("meta"):
        model = catseg.create_model(name)
    target = model.state_dict()
    state = paper_release_state(target)
    expected = (["backbone.res4.22.conv3.norm.running_var", "backbone.res2.0.shortcut.weight"] if "r101" in preset
                else ["backbone.norm2.weight", "backbone.layers.1.downsample.reduction.weight",
                      "backbone.layers.2.blocks.17.attn.relative_position_index"])
    assert all(k in state for k in expected)
    converted = convert_state_dict(state, rules_for(name), target, name)
    assert converted.keys() == target.keys()
    assert all(converted[k].shape == target[k].shape for k in target)
    del state[CLIP + "visual.ln_post.bias"]
    with pytest.raises(ConversionError, match="visual.ln_post.bias"):
        convert_state_dict(state, rules_for(name), target, name)


def test_swin_output_norm_is_a_channel_layer_norm():
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", backbone_out_norm=True).eval()
    for norm in model.backbone.out_norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = images(1)
    with torch.no_grad():
        feats = model.backbone(x)
        raw = model.backbone.body((x - model.backbone.mean) / model.backbone.std)
    for f, r, norm in zip(feats, raw, model.backbone.out_norms):
        expected = F.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2], norm.weight, norm.bias).permute(0, 3, 1, 2)
        torch.testing.assert_close(f, expected)
