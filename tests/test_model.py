"""The model library: shapes, invariances, fine-tuning modes, presets, weights, text cache, bad input."""
import math
import os
import stat

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

import catseg
from catseg.clip import clip_model_config
from catseg.presets import get_config

torch.manual_seed(0)


def images(b, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


def names(n):
    return [f"class number {i}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 7, 171, 847])
def test_output_shape(tiny_model, n):
    with torch.no_grad():
        out = tiny_model(images(2), names(n))
    assert out.shape == (2, n, 32, 32)  # image_size / 4
    assert torch.isfinite(out).all()


def test_class_permutation_permutes_logits(tiny_model):
    vocab = names(23)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = tiny_model(images(2), vocab)
        b = tiny_model(images(2), [vocab[i] for i in perm])
    torch.testing.assert_close(a[:, perm], b, rtol=1e-4, atol=1e-5)


def test_batch_equals_one_at_a_time(tiny_model):
    x = images(3)
    with torch.no_grad():
        batch = tiny_model(x, names(5))
        single = torch.cat([tiny_model(x[i:i + 1], names(5)) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [13, 128, 846])
def test_chunked_equals_unchunked_847(tiny_model, chunk, monkeypatch):
    vocab = names(847)
    x = images(1, seed=3)
    with torch.no_grad():
        monkeypatch.setattr(tiny_model.config, "class_chunk_size", None)  # put back as it was after the test
        full = tiny_model(x, vocab)
        tiny_model.config.class_chunk_size = chunk
        chunked = tiny_model(x, vocab)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)


def test_chunked_training_gradients_match():
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", class_pool_train=1, zero_init_residual=False)
    x, vocab = images(1), names(9)
    grads = []
    for chunk in (None, 4):
        model.zero_grad()
        model.config.class_chunk_size = chunk
        model(x, vocab).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-6)


# -- fine-tuning modes -------------------------------------------------------------------------------------------
def _vit_counts(model):
    visual = model.clip.model.visual
    width, layers = visual.conv1.out_channels, len(visual.transformer.resblocks)
    per_block_attn = 3 * width * width + 3 * width + width * width + width
    return width, layers, per_block_attn, visual.positional_embedding.numel()


def test_finetune_modes_by_name_and_count():
    model = catseg.create_model("catseg_tiny")
    width, layers, attn, pos = _vit_counts(model)

    def clip_trainable():
        return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")}

    assert model.finetune_mode == "attention"  # the preset default
    t = clip_trainable()
    assert sum(t.values()) == layers * attn + pos
    assert all(".attn." in n or n.endswith("visual.positional_embedding") for n in t)
    assert not any(".mlp." in n or ".ln_" in n or "conv1" in n for n in t)
    assert not any(n.startswith("clip.model.transformer.") or "token_embedding" in n for n in t)  # text tower

    model.set_clip_trainable("frozen")
    assert clip_trainable() == {}
    model.set_clip_trainable("full")
    t = clip_trainable()
    visual_total = sum(p.numel() for p in model.clip.model.visual.parameters())
    assert sum(t.values()) == visual_total and all(n.startswith("clip.model.visual.") for n in t)

    # the aggregator and the (ResNet) backbone always train; the groups partition the trainable parameters
    groups = model.parameter_groups()
    assert set(groups) == {"clip", "backbone", "head"}
    total = sum(p.numel() for g in groups.values() for _, p in g)
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sorted(n for g in groups.values() for n, _ in g) == sorted(model.trainable_parameter_names())
    with pytest.raises(ValueError, match="attention, frozen, full"):
        model.set_clip_trainable("lora")


def test_frozen_backbone_preset_field():
    model = catseg.create_model("catseg_tiny", backbone_frozen=True)
    assert model.parameter_groups()["backbone"] == []


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_backbone_batch_norm_frozen_in_training_as_the_reference(frozen_bn):
    """backbone_frozen_bn (the default; off in the tiny preset, whose backbone trains from scratch): in training the
    ResNet's BatchNorms normalise with their running statistics and neither those nor their affine weights change,
    while its convolutions train."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", backbone_frozen_bn=frozen_bn, zero_init_residual=False)  # training mode
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.training != frozen_bn for bn in bns)
    names = {n for n, _ in model.parameter_groups()["backbone"]}
    assert any(n.endswith("conv1.weight") for n in names)
    assert any(".bn" in n for n in names) != frozen_bn
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.rand(2, 3, 128, 128), ["cat", "dog", "grass"]).square().mean().backward()
    opt.step()
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "body.conv1.0.weight" in changed  # the stem (timm zero-initialises each block's last norm)
    bn_state = {k for k in before if ".bn" in k and not k.endswith("num_batches_tracked")}
    assert (changed & bn_state == set()) == frozen_bn
    model.eval().train()  # switching modes keeps the norms frozen
    assert all(bn.training != frozen_bn for bn in bns)


def test_swin_guidance_backbone_has_the_release_stochastic_depth():
    """The release's frozen Swin-B (3 stages, 22 blocks) drops residual branches in training with rates rising
    linearly from 0 to 0.3; the ViT-L/H/G presets' timm Swin-B gives each used block the same rate, and drops nothing
    in evaluation."""
    from catseg.model import TimmBackbone
    from catseg.presets import get_config

    for name in ("catseg_vitl14_swinb", "catseg_vith14_swinb", "catseg_vitg14_swinb_release"):
        cfg = get_config(name)
        with torch.device("meta"):
            body = TimmBackbone(cfg).body
        blocks = [m for m in body.modules() if hasattr(m, "drop_path1")]
        rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
        assert rates == [getattr(b.drop_path2, "drop_prob", 0.0) for b in blocks]
        used = rates[:22]  # stages 1-3: 2 + 2 + 18 blocks; the last stage is not used for guidance
        torch.testing.assert_close(torch.tensor(used), torch.linspace(0, 0.3, 22), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"backbone_drop_path_rate=1.5 must be a number in \[0, 1\)"):
        get_config("catseg_tiny", backbone_drop_path_rate=1.5)
    def drop_rates(model):
        return [m.drop_prob for m in model.backbone.modules() if type(m).__name__ == "DropPath"]

    assert drop_rates(catseg.create_model("catseg_tiny")) == []  # timm's ResNet default: none
    rates = drop_rates(catseg.create_model("catseg_tiny", backbone_drop_path_rate=0.2))
    assert rates and 0 < max(rates) <= 0.2


# -- presets on the meta device ----------------------------------------------------------------------------------
def _block(w, m):
    # ln_1, attn in-proj (qkv) + out-proj, ln_2, mlp fc + proj
    return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)


def clip_param_count(model_cfg, grid):
    """open_clip CLIP ViT parameter count from its config (independent of the module tree)."""
    v, t, e = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    w, p = v["width"], v["patch_size"]
    vis = (3 * p * p * w + w + (grid * grid + 1) * w + 2 * w
           + v["layers"] * _block(w, int(w * v.get("mlp_ratio", 4.0))) + 2 * w + w * e)
    wt = t["width"]
    txt = (t["vocab_size"] * wt + t["context_length"] * wt + t["layers"] * _block(wt, int(wt * t.get("mlp_ratio", 4.0)))
           + 2 * wt + wt * e)
    return vis + txt + 1  # logit_scale


def head_param_count(cfg, clip_dim, templates, guide_dim, dec_dims):
    """Aggregator + decoder parameter count from the config."""
    d, a, tg = cfg.embed_dim, cfg.appearance_guidance_dim, cfg.text_guidance_dim
    hidden = int(d * cfg.mlp_ratio)
    mlp = d * hidden + hidden + hidden * d + d
    attn = lambda g: 2 * ((d + g) * d + d) + 2 * (d * d + d)  # q, k (with guidance), v, proj
    swin_block = 2 * d + attn(a) + 2 * d + mlp
    spatial = 2 * a + 2 * swin_block
    klass = 2 * d + 2 * tg + attn(tg) + 2 * d + mlp
    n = templates * d * 49 + d + guide_dim * a * 9 + a + clip_dim * tg + tg + cfg.num_layers * (spatial + klass)
    cin = d
    for cdim, gdim, cout in zip(dec_dims, cfg.decoder_guidance_dims, cfg.decoder_dims):
        n += cdim * gdim * 9 + gdim
        n += (cin + gdim) * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout
        cin = cout
    return n + cin * 9 + 1


def test_clip_formula_matches_published_count():
    # OpenAI CLIP ViT-B/16 has 149,620,737 parameters at its native 224 px (14 x 14 grid).
    assert clip_param_count(open_clip.get_model_config("ViT-B-16"), 14) == 149_620_737


@pytest.mark.parametrize("name", ["catseg_vitb16_r101", "catseg_vitl14_swinb", "catseg_vith14_swinb",
                                  "catseg_vitg14_swinb"])
def test_full_presets_build_on_meta(name):
    with torch.device("meta"):
        model = catseg.create_model(name)
    assert all(p.is_meta for p in model.parameters())
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    clip_n = clip_param_count(clip_model_config(cfg), model.grid)
    with torch.device("meta"):
        full = timm.create_model(cfg.backbone_model.split(".")[0])
    stages = {"resnet": ["layer4", "fc", "global_pool"], "swin": ["layers.3", "norm", "head"]}[cfg.backbone]
    dropped = sum(p.numel() for n, p in full.named_parameters() if any(n.startswith(s) for s in stages))
    backbone_n = sum(p.numel() for p in full.parameters()) - dropped
    chans = model.backbone.channels
    head_n = head_param_count(cfg, model.clip.embed_dim, 80, chans[-1], chans[-2::-1])
    print(f"{name}: {total:,} parameters (CLIP {clip_n:,}, backbone {backbone_n:,}, aggregator+decoder {head_n:,})")
    assert total == clip_n + backbone_n + head_n
    assert model.grid == 24 and model.output_size == 96


def test_tiny_count_matches_formula(tiny_model):
    cfg = tiny_model.config
    chans = tiny_model.backbone.channels
    clip_n = clip_param_count(clip_model_config(cfg), tiny_model.grid)
    backbone_n = sum(p.numel() for p in tiny_model.backbone.parameters())
    head_n = head_param_count(cfg, tiny_model.clip.embed_dim, 4, chans[-1], chans[-2::-1])
    assert sum(p.numel() for p in tiny_model.parameters()) == clip_n + backbone_n + head_n


def test_list_models_and_unknown_names():
    assert set(catseg.list_models()) >= {"catseg_tiny", "catseg_vitb16_r101", "catseg_vitl14_swinb",
                                         "catseg_vith14_swinb", "catseg_vitg14_swinb"}
    with pytest.raises(ValueError, match="choose one of: .*catseg_tiny"):
        catseg.create_model("catseg_vitx")
    with pytest.raises(ValueError, match="unknown model config field.*num_layerz"):
        catseg.create_model("catseg_tiny", num_layerz=3)
    with pytest.raises(ValueError, match="backbone='vgg'.*resnet, swin, clip, none"):
        catseg.create_model("catseg_tiny", backbone="vgg")


# -- weights -----------------------------------------------------------------------------------------------------
def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = catseg.create_model("catseg_tiny").eval()
    path = catseg.save_weights(model, tmp_path / "w.safetensors")
    torch.manual_seed(2)
    loaded = catseg.create_model("catseg_tiny", pretrained=str(path)).eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, names(4)), model(x, names(4)), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
    umask = os.umask(0o027)  # a group-readable setting: the file follows it, as any other file would
    try:
        shared = catseg.save_weights(model, tmp_path / "shared.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640  # safetensors alone makes it 0o600, unreadable to a team


def test_load_refuses_other_preset_and_pickles(tmp_path):
    model = catseg.create_model("catseg_tiny", embed_dim=16, num_heads=2)
    model.config.name = "catseg_other"
    path = catseg.save_weights(model, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="catseg_other.*catseg_tiny"):
        catseg.create_model("catseg_tiny", pretrained=str(path))
    torch.save({"a": 1}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="safetensors"):
        catseg.create_model("catseg_tiny", pretrained=str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        catseg.create_model("catseg_tiny", pretrained=str(tmp_path / "missing.safetensors"))
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{torn}' is not a readable safetensors weights file"):
        catseg.create_model("catseg_tiny", pretrained=str(torn))
    mine = catseg.save_weights(catseg.create_model("catseg_tiny"), tmp_path / "mine.safetensors")
    with pytest.raises(ValueError, match=r"does not fit preset 'catseg_tiny' as configured: \d+ tensors differ in shape, "
                       r"e.g. cost_embed.bias \(32,\) \(model \(16,\)\); cost_embed.weight \(32, 4, 7, 7\)"):
        catseg.create_model("catseg_tiny", pretrained=str(mine), embed_dim=16, num_heads=2)


def test_weights_rebuild_the_config_overrides_they_were_saved_with(tmp_path):
    """A model built with overrides (an ablation) saves them with its weights: create_model(preset, pretrained=file)
    rebuilds that model, and overrides given there on top win; damaged override metadata is named."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ablated = catseg.create_model("catseg_tiny", num_layers=1, spatial_aggregation=False, zero_init_residual=False)
    path = catseg.save_weights(ablated.eval(), tmp_path / "ablated.safetensors")
    again = catseg.create_model("catseg_tiny", pretrained=path).eval()
    assert len(again.layers) == 1 and again.layers[0].spatial is None
    with torch.no_grad():
        torch.testing.assert_close(again(images(1), names(3)), ablated(images(1), names(3)), rtol=0, atol=0)
    assert catseg.create_model("catseg_tiny", pretrained=path, class_chunk_size=2).config.class_chunk_size == 2
    state = {k: v.contiguous() for k, v in ablated.state_dict().items()}
    save_file(state, str(tmp_path / "bad.safetensors"), {"preset": "catseg_tiny", "overrides": "num_layers=1"})
    with pytest.raises(ValueError, match="bad.safetensors': its 'overrides' metadata is not a JSON object of model "
                                         "config fields: 'num_layers=1'"):
        catseg.create_model("catseg_tiny", pretrained=tmp_path / "bad.safetensors")


def test_pretrained_parts_from_weights_dir(tmp_path):
    """open_clip and timm weights come from local files through the loaders a download feeds."""
    from safetensors.torch import save_file
    from catseg.weights import backbone_weights_file, clip_weights_file

    cfg = get_config("catseg_tiny", clip_pretrained="local", weights_dir=str(tmp_path))
    torch.manual_seed(5)
    clip = open_clip.CLIP(**clip_model_config(cfg))
    backbone = timm.create_model(cfg.backbone_model)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_weights_file(cfg, tmp_path)))
    save_file(backbone.state_dict(), str(backbone_weights_file(cfg, tmp_path)))
    model = catseg.create_model("catseg_tiny", pretrained=True, clip_pretrained="local", weights_dir=str(tmp_path))
    for k, v in clip.state_dict().items():
        torch.testing.assert_close(model.clip.model.state_dict()[k], v, rtol=0, atol=0)
    body = model.backbone.body.state_dict()
    for k in ("conv1.0.weight", "layer1.0.conv1.weight", "layer3.0.bn1.running_mean"):
        torch.testing.assert_close(body[k], backbone.state_dict()[k], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="catseg.download"):
        catseg.create_model("catseg_tiny", pretrained=True, clip_pretrained="local",
                            weights_dir=str(tmp_path / "empty"))


def test_pretrained_clip_positional_embedding_is_resized_bicubic(tmp_path):
    """A 224-px checkpoint (7 x 7 grid at patch 32) loads into the preset's grid by bicubic resizing."""
    from safetensors.torch import save_file
    from catseg.weights import clip_weights_file

    cfg = get_config("catseg_tiny", clip_pretrained="local", weights_dir=str(tmp_path), backbone="none",
                     embedding_guidance=False, upsampling_decoder=False)
    small = clip_model_config(cfg)
    small["vision_cfg"]["image_size"] = 64  # 4 x 4 grid at patch 16
    clip = open_clip.CLIP(**small)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_weights_file(cfg, tmp_path)))
    model = catseg.create_model("catseg_tiny", pretrained=True, clip_pretrained="local", weights_dir=str(tmp_path),
                                backbone="none", embedding_guidance=False, upsampling_decoder=False)
    pos = model.clip.model.visual.positional_embedding
    assert pos.shape == (8 * 8 + 1, 64)
    torch.testing.assert_close(pos[0], clip.visual.positional_embedding[0])  # CLS position kept
    grid = clip.visual.positional_embedding[1:].T.reshape(1, 64, 4, 4)
    expected = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[1:], expected.reshape(64, 64).T, rtol=1e-4, atol=1e-5)


# -- text embeddings ---------------------------------------------------------------------------------------------
def test_cached_text_embeddings_are_fp32_whatever_autocast_the_first_call_ran_under():
    """The cache serves every later call, in any precision: its embeddings are computed in fp32 even when the first
    call comes from a bf16 autocast region (bf16 inference), so results do not depend on the order of calls."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny").eval()
    with torch.no_grad():
        fp32 = model.clip.encode_text(["cat", "dog"])
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        with bf16:
            assert not torch.allclose(model.clip.encode_text(["cat", "dog"]).float(), fp32, atol=1e-4)
            first = model.text_embeddings(["cat", "dog"])
    assert first.dtype == torch.float32
    torch.testing.assert_close(first, fp32, rtol=0, atol=1e-6)
    assert model.text_embeddings(["cat", "dog"]) is first


@pytest.mark.parametrize("preset", ["catseg_tiny", "catseg2_tiny"])  # text tower frozen / trained
def test_a_model_run_under_inference_mode_trains_afterwards(preset):
    """What the first calls cache (text embeddings, prompt tokens, shift masks, resize matrices) serves training
    too when those calls ran under torch.inference_mode(): the training step's gradients equal a fresh model's."""
    from catseg.ops import clear_tensor_caches

    images, names = torch.rand(1, 3, 128, 128), ["cat", "dog", "sky"]

    def gradients(model):
        torch.manual_seed(1)
        model.train()(images, names).square().mean().backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    clear_tensor_caches()  # so that the inference-mode call builds them
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(catseg.create_model(preset, zero_init_residual=False))
    with torch.inference_mode():
        models[0].train()(images, names)  # (a text tower that trains encodes the names in each training call)
        models[0].eval()(images, names)
    used, fresh = gradients(models[0]), gradients(models[1])
    assert len(used) == len(fresh) > 0
    for a, b in zip(used, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_text_cache_per_vocabulary(tiny_model):
    a = tiny_model.text_embeddings(["cat", "dog"])
    assert tiny_model.text_embeddings(["cat", "dog"]) is a  # cached
    b = tiny_model.text_embeddings(["cat", "horse"])
    assert not torch.allclose(a[1], b[1])  # a new vocabulary gets fresh embeddings
    torch.testing.assert_close(a[0], b[0])
    assert a.shape == (2, 4, 64)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 4))


def test_text_cache_cleared_when_weights_change(tmp_path):
    model = catseg.create_model("catseg_tiny").eval()
    before = model.text_embeddings(["cat"])
    torch.manual_seed(9)
    other = catseg.create_model("catseg_tiny")
    model.load_state_dict(other.state_dict())
    after = model.text_embeddings(["cat"])
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, other.eval().text_embeddings(["cat"]))


def test_text_cache_follows_in_place_updates_of_a_training_text_tower():
    torch.manual_seed(0)
    model = catseg.create_model("catseg2_tiny").eval()  # the later design trains the text tower's q/v projections
    trained = [p for p in model.clip.model.transformer.parameters() if p.requires_grad]
    assert trained
    before = model.text_embeddings(["cat", "dog"])
    assert model.text_embeddings(["cat", "dog"]) is before  # cached while nothing changes
    with torch.no_grad():  # an optimizer step, in place as optimizers do
        for p in trained:
            p.add_(torch.randn_like(p))
    after = model.text_embeddings(["cat", "dog"])
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, model.clip.encode_text(["cat", "dog"]).float())
    # a real training step through the trainer's optimizer (fused AdamW leaves the version counters alone)
    from training.config import OptimConfig
    from training.optim import build_optimizer

    optimizer = build_optimizer(model, OptimConfig(clip_lr=1e-2))
    cached = model.text_embeddings(["cat", "dog"])
    model.train()
    model(images(1, model.image_size), ["cat", "dog"]).square().mean().backward()
    optimizer.step()
    model.eval()
    stepped = model.text_embeddings(["cat", "dog"])
    assert not torch.allclose(cached, stepped)
    with torch.no_grad():
        torch.testing.assert_close(stepped, model.clip.encode_text(["cat", "dog"]).float())


def test_synonyms_are_averaged(tiny_model):
    both = tiny_model.text_embeddings(["person, individual"])
    parts = tiny_model.text_embeddings(["person", "individual"])
    expected = torch.nn.functional.normalize(parts.mean(dim=0), dim=-1)
    torch.testing.assert_close(both[0], expected, rtol=1e-5, atol=1e-6)


def test_dense_features_are_normalised_and_skip_last_token_mixing(tiny_model):
    x = images(1)
    with torch.no_grad():
        dense, _ = tiny_model.clip.encode_dense(x)
        torch.testing.assert_close(dense.norm(dim=1), torch.ones(1, 8, 8))
        # changing one patch must leave other patches' features unchanged only if the last block mixes nothing
        # and the earlier blocks do: so a change reaches other tokens (earlier blocks) -- check the last block alone
        v = tiny_model.clip.model.visual
        tokens = torch.randn(1, 65, 64)
        out = tiny_model.clip._last_block_value_path(v.transformer.resblocks[-1], tokens)
        tokens2 = tokens.clone()
        tokens2[0, 5] += 1.0
        out2 = tiny_model.clip._last_block_value_path(v.transformer.resblocks[-1], tokens2)
    changed = (out2 - out).abs().sum(-1)[0]
    assert changed[5] > 0 and torch.all(changed[torch.arange(65) != 5] == 0)


# -- ablation switches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    dict(aggregation="feature"),
    dict(spatial_aggregation=False),
    dict(class_aggregation=False),
    dict(embedding_guidance=False),
    dict(upsampling_decoder=False),
    dict(num_layers=1),
    dict(num_layers=3),
    dict(backbone="clip", clip_guidance_layers=(1, 1), clip_guidance_upsample_dims=(16, 8)),
    dict(backbone="none"),
    dict(decoder_upsample="transposed"),
    dict(top_k_classes=3),
])
def test_ablation_switches(overrides):
    model = catseg.create_model("catseg_tiny", zero_init_residual=False, **overrides)
    out = model(images(2), names(5))
    assert out.shape == (2, 5, 32, 32)
    out.mean().backward()
    if overrides.get("top_k_classes"):
        assert (out == -100).flatten(2).all(-1).sum(dim=1).tolist() == [2, 2]
    if overrides.get("embedding_guidance") is False:
        assert model.appearance_proj is None and model.text_proj is None


def test_class_pooling_only_in_training():
    """Training pools the cost 2x2 before class attention: the block's update is the evaluation-mode update of the
    pooled map, upsampled; evaluation does not pool. (A whole model differs between the modes anyway where its
    backbone normalises with batch statistics, so the block is checked alone.)"""
    from catseg.aggregation import ClassAggregation, chunk_slices
    from catseg.ops import resize

    torch.manual_seed(0)
    block = ClassAggregation(dim=8, guidance_dim=4, num_heads=2, mlp_ratio=2.0, pool=2)
    x, guidance, chunks = torch.randn(1, 3, 8, 4, 4), torch.randn(3, 4), chunk_slices(3, None)
    with torch.no_grad():
        pooled = block.train()([x], guidance, chunks)[0]
        plain = block.eval()([x], guidance, chunks)[0]
        small = F.avg_pool2d(x.flatten(0, 1), 2).unflatten(0, (1, 3))
        update = block([small], guidance, chunks)[0] - small
    torch.testing.assert_close(pooled, x + resize(update.flatten(0, 1), (4, 4)).unflatten(0, (1, 3)))
    assert not torch.allclose(pooled, plain)


def test_the_paper_last_clip_block_is_its_value_path_with_the_token_residual(tiny_model):
    """MaskCLIP's last block: each token's value projection and output projection plus the token itself, then the
    block's MLP (no attention between tokens), written out from the block's weights."""
    block = tiny_model.clip.model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 65, 64)
    width = block.attn.in_proj_weight.shape[1]
    w_v, b_v = block.attn.in_proj_weight[2 * width:], block.attn.in_proj_bias[2 * width:]
    with torch.no_grad():
        y = x + block.attn.out_proj(F.linear(block.ln_1(x), w_v, b_v))
        y = y + block.mlp(block.ln_2(y))
        torch.testing.assert_close(tiny_model.clip._last_block_value_path(block, x), y)


@pytest.mark.parametrize("renormalize", [False, True])
def test_text_guidance_is_the_template_mean(renormalize):
    """The class aggregation's text guidance projects each class's embedding averaged over the templates
    (L2-normalised again in the release's variant)."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", text_guidance_renormalize=renormalize).eval()
    seen = []
    hook = model.text_proj.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        model(images(1), ["cat", "dog", "sky"])
    hook.remove()
    mean = model.text_embeddings(["cat", "dog", "sky"]).mean(1)
    torch.testing.assert_close(seen[0], F.normalize(mean, dim=-1) if renormalize else mean)


def test_the_guidance_backbone_takes_imagenet_statistics(tiny_model):
    x = images(1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        for ours, expected in zip(tiny_model.backbone(x), tiny_model.backbone.body((x - mean) / std)):
            torch.testing.assert_close(ours, expected)


def test_openai_clip_presets_use_quick_gelu():
    """OpenAI's CLIP weights were trained with QuickGELU, OpenCLIP's LAION ones (ViT-H/G) with GELU."""
    for name, quick in [("catseg_vitb16_r101", True), ("catseg_vitl14_swinb", True), ("catseg2_vitb16", True),
                        ("catseg_vith14_swinb", False)]:
        with torch.device("meta"):
            model = catseg.create_model(name)
        kinds = {type(m) for m in model.clip.model.modules()}
        assert (open_clip.model.QuickGELU in kinds) == quick, name


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_model(images(1) * 255, names(2))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model(torch.rand(1, 1, 128, 128), names(2))
    with pytest.raises(ValueError, match="128x128"):
        tiny_model(torch.rand(1, 3, 96, 128), names(2))
    with pytest.raises(TypeError, match="float tensor"):
        tiny_model((images(1) * 255).to(torch.uint8), names(2))
    with pytest.raises(ValueError, match="empty"):
        tiny_model(images(1), [])
    with pytest.raises(ValueError, match="duplicate class names.*cat"):
        tiny_model(images(1), ["cat", "dog", "cat"])
    with pytest.raises(TypeError, match="list of strings"):
        tiny_model(images(1), "cat")
    with pytest.raises(ValueError, match="non-empty"):
        tiny_model(images(1), ["cat", " "])
    with pytest.raises(ValueError, match=r"not only commas\), got \[' , '\]"):
        tiny_model(images(1), ["cat", " , "])  # no synonym left: its embedding would be 0 / 0
    nan = images(1)
    nan[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # NaN compares false with both bounds
        tiny_model(nan, names(2))


def test_config_validation():
    with pytest.raises(ValueError, match="embed_dim=30 must be divisible by num_heads=4"):
        catseg.create_model("catseg_tiny", embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match=r"clip_guidance_layers=\(1, 2\).*1\.\.1"):
        catseg.create_model("catseg_tiny", backbone="clip", clip_guidance_layers=(1, 2))
    with pytest.raises(ValueError, match="window_size=3 must divide the cost grid 8"):
        catseg.create_model("catseg_tiny", window_size=3)
    assert math.isclose(get_config("catseg_tiny").mlp_ratio, 4.0)
    with pytest.raises(ValueError, match="inference_stride=200 must be <= image_size=128"):
        catseg.create_model("catseg_tiny", inference_size=400, inference_stride=200)
    with pytest.raises(ValueError, match=r"backbone_indices \(2, 3\) must name 3 feature stages"):
        catseg.create_model("catseg_tiny", backbone_indices=(2, 3))
    with pytest.raises(TypeError, match="pretrained must be False, True or a .safetensors path, got int 1"):
        catseg.create_model("catseg_tiny", pretrained=1)


@pytest.mark.parametrize("field, value, message", [
    ("num_layers", "2", "num_layers='2' must be an integer >= 0"),
    ("num_layers", 1.5, "num_layers=1.5 must be an integer >= 0"),
    ("window_size", True, "window_size=True must be an integer >= 1"),  # a bool is no size (True would be 1)
    ("class_chunk_size", "a", "class_chunk_size='a' must be an integer >= 1 or None"),
    ("clip_context_length", 0, "clip_context_length=0 must be an integer >= 1"),
    ("appearance_guidance_dim", -4, r"appearance_guidance_dim=-4 must be an integer >= 0 \(0 = no guidance\)"),
    ("text_guidance_dim", "a", "text_guidance_dim='a' must be an integer >= 0"),
    ("mlp_ratio", 0, r"mlp_ratio=0 must be a number with mlp_ratio \* embed_dim >= 1"),
    ("mlp_ratio", -1, r"mlp_ratio=-1 must be a number"),
    ("decoder_dims", (0, 8), r"decoder_dims=\(0, 8\) must be a list of integers >= 1"),
    ("decoder_dims", 5, "decoder_dims=5 must be a list of integers"),
    ("backbone_indices", ("a", 1, 2), r"backbone_indices=\('a', 1, 2\) must be a list of integers"),
])
def test_config_values_of_the_wrong_kind_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_config("catseg_tiny", **{field: value})


def test_backbone_stages_and_clip_guidance_widths_are_checked():
    with pytest.raises(ValueError, match=r"backbone_indices=\(1, 2, 9\) name a feature stage that resnet10t does "
                                         r"not have; its stages are 0\.\.4"):
        catseg.create_model("catseg_tiny", backbone_indices=(1, 2, 9))
    for dims in ((32,), (32, 16, 8)):  # one transposed convolution per decoder stage
        with pytest.raises(ValueError, match="needs one clip_guidance_upsample_dims entry per decoder stage"):
            get_config("catseg2_tiny", clip_guidance_upsample_dims=dims)


def test_zero_init_blocks_start_as_identity():
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny").eval()
    x = images(1)
    with torch.no_grad():
        with_layers = model(x, names(4))
        model.layers = torch.nn.ModuleList()
        without = model(x, names(4))
    torch.testing.assert_close(with_layers, without, rtol=1e-5, atol=1e-6)
    active = catseg.create_model("catseg_tiny", zero_init_residual=False)
    assert active.layers[0].spatial.blocks[0].attn.proj.weight.abs().sum() > 0
