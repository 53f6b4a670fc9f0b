"""Weights files, downloads, CLIP loading, the factory, config validation and the release converter: behaviour the
rest of the suite leaves unchecked (found by a mutation-testing pass). Tiny presets, random weights, no network."""
import pathlib
import pickle

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import catseg
from catseg import convert_official
from catseg.clip import (TEMPLATE_SETS, ClipEncoder, clip_model_config, download_clip_weights, load_clip_weights,
                         split_synonyms)
from catseg.config import CatSegConfig
from catseg.convert_official import ConversionError, convert_state_dict, resize_positional_embedding
from catseg.presets import get_config, preset_overrides
from catseg.weights import (backbone_weights_file, check_weights_file, clip_weights_file, read_overrides, read_preset,
                            write_safetensors)


def _state(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    return catseg.create_model("catseg_tiny").eval()


# -- weights files ------------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "w.safetensors"
    target.mkdir()  # the rename onto it fails after the temporary file is complete
    with pytest.raises(OSError):
        write_safetensors({"x": torch.zeros(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_a_weights_file_without_metadata_loads(tiny, tmp_path):
    """A plain safetensors state dict (no preset tag, no overrides) is accepted and loaded as it is."""
    path = tmp_path / "plain.safetensors"
    save_file(_state(tiny), str(path))
    assert read_preset(path) is None and read_overrides(path) == {}
    loaded = catseg.create_model("catseg_tiny", pretrained=path)
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_overrides_metadata_that_is_json_but_not_an_object_is_named(tiny, tmp_path):
    path = tmp_path / "list.safetensors"
    save_file(_state(tiny), str(path), {"preset": "catseg_tiny", "overrides": "[1, 2]"})
    with pytest.raises(ValueError, match=r"its 'overrides' metadata is not a JSON object of model config fields: "
                                         r"'\[1, 2\]'"):
        read_overrides(path)
    with pytest.raises(ValueError, match="not a JSON object"):
        catseg.create_model("catseg_tiny", pretrained=path)


def test_weights_paths_empty_folders_and_pickles_are_refused_by_name(tiny, tmp_path):
    with pytest.raises(ValueError, match="the weights path is empty"):
        catseg.create_model("catseg_tiny", pretrained="")
    with pytest.raises(ValueError, match="the weights path is empty"):
        check_weights_file("  ")
    empty = tmp_path / "ckpt-empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        catseg.create_model("catseg_tiny", pretrained=empty)
    pth = tmp_path / "w.pth"
    torch.save(tiny.state_dict(), pth)
    with pytest.raises(ValueError, match=r"load from \.safetensors files only \(no pickles\)"):
        catseg.create_model("catseg_tiny", pretrained=pth)


def test_a_training_checkpoint_folder_loads_its_model_safetensors(tiny, tmp_path):
    folder = tmp_path / "step-00000010"
    catseg.save_weights(tiny, folder / "model.safetensors")
    assert check_weights_file(folder) == folder / "model.safetensors"
    loaded = catseg.create_model("catseg_tiny", pretrained=folder)
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_overrides_given_to_create_model_win_over_the_files(tmp_path):
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", class_chunk_size=4, top_k_classes=3)
    path = catseg.save_weights(model, tmp_path / "w.safetensors")
    assert read_overrides(path) == {"class_chunk_size": 4, "top_k_classes": 3}
    again = catseg.create_model("catseg_tiny", pretrained=path, class_chunk_size=2)
    assert (again.config.class_chunk_size, again.config.top_k_classes) == (2, 3)


def test_missing_and_unexpected_tensors_are_listed(tiny, tmp_path):
    state = _state(tiny)
    dropped = "head.bias"
    short = {k: v for k, v in state.items() if k != dropped}
    save_file(short, str(tmp_path / "short.safetensors"), {"preset": "catseg_tiny"})
    with pytest.raises(ValueError, match=rf"does not match preset 'catseg_tiny': missing \['{dropped}'\], "
                                         rf"unexpected \[\]"):
        catseg.create_model("catseg_tiny", pretrained=tmp_path / "short.safetensors")
    save_file({**state, "extra.weight": torch.zeros(3)}, str(tmp_path / "long.safetensors"), {"preset": "catseg_tiny"})
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra.weight'\]"):
        catseg.create_model("catseg_tiny", pretrained=tmp_path / "long.safetensors")


def test_prefetched_file_names_do_not_collide_between_tags_and_backbones(tmp_path):
    a = get_config("catseg_tiny", clip_pretrained="tag_a")
    b = get_config("catseg_tiny", clip_pretrained="tag_b")
    assert clip_weights_file(a, tmp_path) != clip_weights_file(b, tmp_path)
    r10 = get_config("catseg_tiny", backbone_model="resnet10t")
    r18 = get_config("catseg_tiny", backbone_model="resnet18")
    assert backbone_weights_file(r10, tmp_path) != backbone_weights_file(r18, tmp_path)
    assert clip_weights_file(a, tmp_path).parent == backbone_weights_file(r10, tmp_path).parent == tmp_path


# -- download (the network fetchers replaced by local files) ------------------------------------------------------
def test_download_refuses_a_preset_without_pretrained_weights(tmp_path):
    from catseg.download import download_preset_weights

    with pytest.raises(ValueError, match="preset 'catseg_tiny' has no pretrained weights to download"):
        download_preset_weights("catseg_tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_downloaded_files_are_the_ones_pretrained_true_reads(tmp_path, monkeypatch):
    """download_preset_weights writes the CLIP and backbone files create_model(pretrained=True, weights_dir=...)
    loads. Only the two network fetches are replaced (by local random weights): no network here."""
    import catseg.download as download

    cfg = get_config("catseg_tiny", clip_pretrained="local")
    torch.manual_seed(11)
    source_clip = open_clip.CLIP(**clip_model_config(cfg))
    source_file = tmp_path / "open_clip.safetensors"
    save_file(_state(source_clip), str(source_file))
    made = {}
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        torch.manual_seed(12)
        made["backbone"] = real_create(name, pretrained=False, **kwargs)
        return made["backbone"]

    monkeypatch.setattr(download, "get_config", lambda name: cfg)
    monkeypatch.setattr(download, "download_clip_weights", lambda c: str(source_file))
    monkeypatch.setattr(download.timm, "create_model", offline_create)
    out = tmp_path / "weights"
    written = download.download_preset_weights("catseg_tiny", out)
    monkeypatch.undo()
    assert written == [clip_weights_file(cfg, out), backbone_weights_file(cfg, out)]
    assert all(p.is_file() for p in written)
    model = catseg.create_model("catseg_tiny", pretrained=True, clip_pretrained="local", weights_dir=str(out))
    for k, v in source_clip.state_dict().items():
        assert torch.equal(model.clip.model.state_dict()[k], v), k
    body = model.backbone.body.state_dict()
    own = made["backbone"].state_dict()
    for k in ("conv1.0.weight", "layer1.0.conv1.weight", "layer3.0.bn1.running_mean"):
        assert torch.equal(body[k], own[k]), k


# -- CLIP -----------------------------------------------------------------------------------------------------------
def test_clip_input_size_and_context_length_follow_the_config():
    enc = ClipEncoder(get_config("catseg_tiny", clip_image_size=64, clip_context_length=8))
    assert enc.grid == 4 and enc.model.visual.positional_embedding.shape[0] == 4 * 4 + 1
    assert enc.model.positional_embedding.shape[0] == 8
    tokens, _, _ = enc.prompt_tokens(["cat"])
    assert tokens.shape[-1] == 8
    dense, _ = enc.encode_dense(torch.rand(1, 3, 64, 64))
    assert dense.shape == (1, 64, 4, 4)


def test_unknown_prompt_template_set_is_named():
    with pytest.raises(ValueError, match="prompt_templates='nope' is not valid; choose one of: .*simple4"):
        ClipEncoder(get_config("catseg_tiny", prompt_templates="nope"))


def test_synonyms_average_per_template_and_empty_parts_are_ignored(tiny):
    enc = tiny.clip
    assert split_synonyms(" cat, ,kitty ,") == ["cat", "kitty"]
    with torch.no_grad():
        single = enc.encode_text(["dog", "cat", "kitty"])
        mixed = enc.encode_text(["dog", "cat, kitty"])
        trailing = enc.encode_text(["cat,", "dog"])
    torch.testing.assert_close(mixed[0], single[0])
    torch.testing.assert_close(mixed[1], F.normalize(single[1] + single[2], dim=-1))  # per template
    torch.testing.assert_close(trailing, single[[1, 0]])


def test_text_of_a_new_vocabulary_is_not_served_from_the_token_cache(tiny):
    with torch.no_grad():
        first = tiny.clip.encode_text(["cat", "dog"])
        second = tiny.clip.encode_text(["car", "tree"])
        fresh = ClipEncoder(tiny.config)
        fresh.load_state_dict(tiny.clip.state_dict())
        torch.testing.assert_close(second, fresh.encode_text(["car", "tree"]))
    assert not torch.allclose(first, second)


class _TouchOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_clip_weights_are_read_without_running_pickled_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": _TouchOnLoad(str(marker))}, path)
    enc = ClipEncoder(get_config("catseg_tiny"))
    with pytest.raises(pickle.UnpicklingError):
        load_clip_weights(enc, str(path))
    assert not marker.exists()


def _clip_file(cfg, tmp_path, **vision):
    small = clip_model_config(cfg)
    small["vision_cfg"].update(vision)
    torch.manual_seed(4)
    clip = open_clip.CLIP(**small)
    return clip, _state(clip)


def test_positional_embedding_is_shrunk_bicubic_without_antialias(tmp_path):
    cfg = get_config("catseg_tiny")  # 8 x 8 grid
    clip, state = _clip_file(cfg, tmp_path, image_size=256)  # 16 x 16 grid
    save_file(state, str(tmp_path / "big.safetensors"))
    enc = ClipEncoder(cfg)
    load_clip_weights(enc, str(tmp_path / "big.safetensors"))
    pos = clip.visual.positional_embedding.detach()
    grid = pos[1:].T.reshape(1, 64, 16, 16)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(enc.model.visual.positional_embedding[1:], expected.reshape(64, 64).T,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.model.visual.positional_embedding[0], pos[0])


def test_clip_file_with_a_1d_logit_scale_loads_and_an_incomplete_one_is_refused(tmp_path):
    cfg = get_config("catseg_tiny")
    clip, state = _clip_file(cfg, tmp_path)
    state["logit_scale"] = torch.full((1,), 2.5)
    save_file(state, str(tmp_path / "scale.safetensors"))
    enc = ClipEncoder(cfg)
    load_clip_weights(enc, str(tmp_path / "scale.safetensors"))
    assert enc.model.logit_scale.shape == clip.logit_scale.shape and float(enc.model.logit_scale.detach()) == 2.5
    del state["ln_final.weight"]
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(RuntimeError, match="ln_final.weight"):
        load_clip_weights(ClipEncoder(cfg), str(tmp_path / "short.safetensors"))


def test_a_preset_without_pretrained_clip_weights_is_refused_offline():
    cfg = get_config("catseg_tiny")
    with pytest.raises(ValueError, match="open_clip has no pretrained tag 'none' for 'tiny'"):
        download_clip_weights(cfg)
    with pytest.raises(ValueError, match="has no pretrained weights; use pretrained=False"):
        catseg.create_model("catseg_tiny", pretrained=True)


def test_weights_dir_missing_only_the_backbone_file_names_it(tmp_path):
    cfg = get_config("catseg_tiny", clip_pretrained="local", weights_dir=str(tmp_path))
    _, state = _clip_file(cfg, tmp_path)
    save_file(state, str(clip_weights_file(cfg, tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"lacks \[.*backbone-resnet10t\.safetensors'\]; fetch them once"):
        catseg.create_model("catseg_tiny", pretrained=True, clip_pretrained="local", weights_dir=str(tmp_path))


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("sigmoid_at_crop_size", "yes", "sigmoid_at_crop_size='yes' must be True or False"),
    ("mlp_ratio", 0.01, r"mlp_ratio=0.01 must be a number with mlp_ratio \* embed_dim >= 1"),
    ("backbone_drop_path_rate", 1.0, r"backbone_drop_path_rate=1.0 must be a number in \[0, 1\)"),
])
def test_more_config_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_config("catseg_tiny", **{field: value})


def test_boundary_config_values_are_accepted():
    assert get_config("catseg_tiny", num_layers=0).num_layers == 0
    assert get_config("catseg_tiny", decoder_guidance_dims=(0, 0)).decoder_guidance_dims == (0, 0)
    cfg = get_config("catseg_tiny", inference_size=128, inference_stride=128)  # one crop covering the image
    assert (cfg.inference_size, cfg.inference_stride) == (cfg.image_size, cfg.image_size)


def test_list_valued_fields_become_tuples_and_are_no_overrides(tmp_path):
    """A config read from YAML/JSON gives lists; the model config is the same as the preset's (no spurious
    overrides stored with the weights)."""
    cfg = get_config("catseg_tiny", decoder_dims=[16, 8], backbone_indices=[1, 2, 3])
    assert cfg.decoder_dims == (16, 8) and cfg.backbone_indices == (1, 2, 3)
    assert cfg == get_config("catseg_tiny")
    assert preset_overrides(cfg) == {}


def test_defaults_are_the_papers_design():
    """CatSegConfig's defaults are the paper's ViT-B model (see the paper and notes/reference-facts.md)."""
    cfg = CatSegConfig()
    assert (cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.window_size, cfg.mlp_ratio) == (128, 2, 4, 12, 4.0)
    assert cfg.class_pool_train == 2 and not cfg.class_pool_eval  # 2x2 pooling in training only
    assert cfg.prompt_templates == "imagenet80" and len(TEMPLATE_SETS[cfg.prompt_templates]) == 80
    assert cfg.synonyms == "mean" and cfg.finetune == "attention"
    assert (cfg.image_size, cfg.clip_image_size, cfg.inference_size, cfg.inference_stride) == (384, 384, 640, 256)
    assert len(cfg.decoder_dims) == 2 and cfg.decoder_upsample == "bilinear"  # N_U = 2, bilinear (paper 3.4)


def test_preset_design_choices():
    """Presets follow the reference facts: Swin-B frozen with stages 1..3, the later design's CLIP taps and its
    256-class padding."""
    for name in ("catseg_vitl14_swinb", "catseg_vith14_swinb", "catseg_vitg14_swinb"):
        cfg = get_config(name)
        assert cfg.backbone == "swin" and cfg.backbone_frozen and cfg.backbone_indices == (0, 1, 2), name
    assert get_config("catseg2_vitb16").clip_guidance_layers == (4, 8)
    assert get_config("catseg2_vitl14").clip_guidance_layers == (8, 16)
    assert get_config("catseg2_vitb16").class_pad_to == get_config("catseg2_vitl14").class_pad_to == 256


# -- release conversion ---------------------------------------------------------------------------------------------
def test_bookkeeping_from_the_checkpoint_is_kept_and_filled_when_absent():
    bn = torch.nn.BatchNorm1d(3)
    target = {f"bn.{k}": v for k, v in bn.state_dict().items()}
    state = {f"src.{k}": torch.rand_like(v.float()).to(v.dtype) for k, v in bn.state_dict().items()}
    state["src.num_batches_tracked"] = torch.tensor(7)
    out = convert_state_dict(state, [(r"src\.(.+)", r"bn.\1")], target)
    assert int(out["bn.num_batches_tracked"]) == 7
    del state["src.num_batches_tracked"]
    out = convert_state_dict(state, [(r"src\.(.+)", r"bn.\1")], target)
    assert int(out["bn.num_batches_tracked"]) == 0


def test_incomplete_split_qkv_is_a_conversion_error_that_names_it():
    target = {"a.attn.in_proj_weight": torch.zeros(6, 2)}
    state = {"a.attn.q_proj_weight": torch.zeros(2, 2), "a.attn.k_proj_weight": torch.zeros(2, 2)}
    with pytest.raises(ConversionError, match=r"a\.attn\.q_proj_weight.*\n.*missing.*a\.attn\.in_proj_weight"):
        convert_state_dict(state, [(r"(.+)", r"\1")], target)


def test_fused_release_qkv_is_split_for_a_split_target():
    fused = torch.arange(12.0).reshape(6, 2)
    target = {f"a.attn.{c}_proj_weight": torch.zeros(2, 2) for c in "qkv"}
    out = convert_state_dict({"a.attn.in_proj_weight": fused}, [(r"(.+)", r"\1")], target)
    for c, part in zip("qkv", fused.chunk(3)):
        assert torch.equal(out[f"a.attn.{c}_proj_weight"], part)


def test_positional_embedding_resize_refuses_a_non_square_target():
    with pytest.raises(ConversionError, match="cannot be resized to 51"):
        resize_positional_embedding(torch.zeros(17, 4), 51)


def test_converted_tensors_take_the_presets_dtype_and_shapes_are_checked():
    target = {"w": torch.zeros(2, 3)}
    out = convert_state_dict({"w": torch.ones(2, 3, dtype=torch.float16)}, [(r"(.+)", r"\1")], target)
    assert out["w"].dtype == torch.float32
    with pytest.raises(ConversionError, match=r"1 shape mismatch\(es\): w: checkpoint \(3, 2\), preset \(2, 3\)"):
        convert_state_dict({"w": torch.ones(3, 2)}, [(r"(.+)", r"\1")], target)


def test_command_line_refuses_a_non_safetensors_output_and_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_official.main([str(tmp_path / "model.pth"), "--preset", "catseg2_tiny", "--out",
                               str(tmp_path / "out.pth")])
    assert exit_.value.code == 2 and "must end in .safetensors" in capsys.readouterr().err
    assert convert_official.main([str(tmp_path / "missing.pth"), "--preset", "catseg2_tiny", "--out",
                                  str(tmp_path / "out.safetensors")]) == 2
    assert "missing.pth' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_text_embeddings_follow_weights_loaded_into_the_clip_encoder(tmp_path):
    """Text embeddings cached for a vocabulary are computed again once weights are loaded into the text tower (the
    frozen one of the default fine-tuning), whatever module they were loaded into: `model.clip`, its open_clip model,
    one text block, with tensors assigned in place of the parameters, or from a CLIP weights file."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny").eval()
    torch.manual_seed(1)
    other = catseg.create_model("catseg_tiny").eval()
    names = ["cat", "dog"]
    want, before = other.text_embeddings(names), model.text_embeddings(names)
    assert not torch.allclose(want, before)
    original = {k: v.clone() for k, v in model.clip.state_dict().items()}
    wanted = {k: v.clone() for k, v in other.clip.model.state_dict().items()}  # (fresh tensors for each load)

    def load(how):
        model.clip.load_state_dict(original)  # back to the first weights, whose embeddings the cache holds
        assert torch.equal(model.text_embeddings(names), before)
        how()
        torch.testing.assert_close(model.text_embeddings(names), want)

    load(lambda: model.clip.load_state_dict({f"model.{k}": v for k, v in wanted.items()}))
    load(lambda: model.clip.model.load_state_dict(wanted))
    load(lambda: model.clip.model.load_state_dict({k: v.clone() for k, v in wanted.items()}, assign=True))
    save_file({k: v.contiguous() for k, v in wanted.items()}, str(tmp_path / "clip.safetensors"))
    load(lambda: load_clip_weights(model.clip, str(tmp_path / "clip.safetensors")))

    model.clip.load_state_dict(original)
    model.text_embeddings(names)
    for i, block in enumerate(model.clip.model.transformer.resblocks):  # one block alone is seen too
        prefix = f"transformer.resblocks.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in wanted.items() if k.startswith(prefix)})
        assert not torch.allclose(model.text_embeddings(names), before), i
        block.load_state_dict({k[len("model." + prefix):]: v for k, v in original.items()
                               if k.startswith("model." + prefix)})
    # loads into the image tower alone keep the cached embeddings
    cached = model.text_embeddings(names)
    model.clip.model.visual.load_state_dict(other.clip.model.visual.state_dict())
    assert model.text_embeddings(names) is cached
