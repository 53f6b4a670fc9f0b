"""The later (CVPR 2024) design: presets, query/value fine-tuning of both towers, q/k/v layouts, class padding,
pooled class aggregation in evaluation, first-synonym prompts, raw CLIP guidance."""
import pytest
import torch

import catseg
from catseg.presets import get_config


def images(b, seed=0):
    return torch.rand(b, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def names(n):
    return [f"class number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def model2():
    torch.manual_seed(0)
    model = catseg.create_model("catseg2_tiny").eval()
    with torch.no_grad():  # learned padding starts at zero; make it count
        for layer in model.layers:
            layer.klass.padding_tokens.normal_()
            layer.klass.padding_guidance.normal_()
    return model


def qv_count(width, layers, text_width, text_layers):
    # the last visual block's query is unused (value path only), so it stays frozen
    return 2 * width * width * layers - width * width + 2 * text_width * text_width * text_layers


@pytest.mark.parametrize("name,width,layers,text_width", [("catseg2_vitb16", 768, 12, 512),
                                                           ("catseg2_vitl14", 1024, 24, 768)])
def test_presets_train_query_and_value_weights_of_both_towers(name, width, layers, text_width):
    assert name in catseg.list_models()
    with torch.device("meta"):
        model = catseg.create_model(name)
    assert model.backbone is None and model.finetune_mode == "qv" and len(model.clip.templates) == 1
    clip = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")}
    assert sum(clip.values()) == qv_count(width, layers, text_width, 12)
    assert all(n.endswith((".attn.q_proj_weight", ".attn.v_proj_weight")) for n in clip)
    assert any(n.startswith("clip.model.transformer.") for n in clip)  # the text tower trains too
    assert [n for n, _ in model.parameter_groups()["backbone"]] == []


def test_qv_mode_by_name_and_count():
    model = catseg.create_model("catseg2_tiny")
    w, vis_layers, text_layers = 64, 3, 2

    def clip_trainable():
        return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")}

    t = clip_trainable()
    assert sum(t.values()) == qv_count(w, vis_layers, w, text_layers)
    assert len(t) == 2 * (vis_layers + text_layers) - 1
    assert not any(n.endswith(f"resblocks.{vis_layers - 1}.attn.q_proj_weight") and ".visual." in n for n in t)
    for frozen in ("k_proj_weight", "in_proj_bias", "out_proj", "positional_embedding", "mlp", "ln_"):
        assert not any(frozen in n for n in t), frozen
    # other modes still work on the split layout and count the same as on the fused one
    model.set_clip_trainable("attention")
    attn = 4 * w * w + 4 * w
    assert sum(clip_trainable().values()) == vis_layers * attn + model.clip.model.visual.positional_embedding.numel()
    model.set_clip_trainable("frozen")
    assert clip_trainable() == {}
    with pytest.raises(ValueError, match="attention, frozen, full, qv"):
        model.set_clip_trainable("kv")


def test_splitting_keeps_outputs_and_either_layout_loads(tmp_path):
    torch.manual_seed(3)
    fused = catseg.create_model("catseg_tiny").eval()
    assert "clip.model.visual.transformer.resblocks.0.attn.in_proj_weight" in fused.state_dict()
    x, vocab = images(1), names(3)
    with torch.no_grad():
        before = fused(x, vocab)
    fused_file = catseg.save_weights(fused, tmp_path / "fused.safetensors")
    fused.set_clip_trainable("qv")
    sd = fused.state_dict()
    assert "clip.model.visual.transformer.resblocks.0.attn.q_proj_weight" in sd
    assert not any(k.endswith("in_proj_weight") for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, vocab), before, rtol=1e-5, atol=1e-5)
    split_file = catseg.save_weights(fused, tmp_path / "split.safetensors")
    fresh = catseg.create_model("catseg_tiny", pretrained=str(split_file)).eval()  # split file -> fused model
    other = catseg.create_model("catseg_tiny", finetune="qv", pretrained=str(fused_file)).eval()  # and back
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, vocab), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other(x, vocab), before, rtol=1e-5, atol=1e-5)


def test_text_tower_trains_without_cached_embeddings():
    torch.manual_seed(0)
    model = catseg.create_model("catseg2_tiny").train()
    a, b = model.text_embeddings(["cat"]), model.text_embeddings(["cat"])
    assert a is not b and a.requires_grad
    model(images(1), names(3)).mean().backward()
    text_attn = model.clip.model.transformer.resblocks[0].attn
    assert text_attn.q_proj_weight.grad is not None and text_attn.v_proj_weight.grad is not None
    assert text_attn.k_proj_weight.grad is None and text_attn.in_proj_bias.grad is None
    model.eval()
    assert model.text_embeddings(["cat"]) is model.text_embeddings(["cat"])  # cached again in evaluation


def test_trained_text_tower_tokenizes_each_vocabulary_once():
    """With the text tower training, every step encodes the vocabulary again but reuses its prompt tokens (host
    work); the embeddings are those of a fresh tokenization, and the cache keeps the last two vocabularies."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg2_tiny").train()
    calls = []
    tokenize = model.clip.tokenizer
    model.clip.tokenizer = lambda texts: calls.append(list(texts)) or tokenize(texts)
    vocab = ["cat", "dog, puppy", "grass"]
    first, again = model.text_embeddings(vocab), model.text_embeddings(vocab)
    assert len(calls) == 1 and first is not again and again.requires_grad
    fresh = catseg.create_model("catseg2_tiny").train()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(again, fresh.text_embeddings(vocab), rtol=0, atol=0)
    for other in (["sky"], ["road"], vocab):  # the cache holds two vocabularies: vocab has gone by the third
        model.text_embeddings(other)
    assert len(calls) == 4


def test_class_pooling_in_training_and_optionally_in_evaluation(model2):
    pooled = catseg.create_model("catseg2_tiny", class_pool_eval=True)
    pooled.load_state_dict(model2.state_dict())
    x, vocab = images(1, seed=1), names(4)
    outs = {}
    with torch.no_grad():
        for key, model in (("default", model2), ("pool_eval", pooled)):
            for mode in ("train", "eval"):
                getattr(model, mode)()
                outs[key, mode] = model(x, vocab)
    torch.testing.assert_close(outs["pool_eval", "train"], outs["pool_eval", "eval"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["default", "train"], outs["pool_eval", "eval"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["default", "eval"], outs["pool_eval", "eval"], atol=1e-3)  # no pooling


@pytest.mark.parametrize("n,chunk", [(5, 2), (12, 5), (20, 7)])
def test_chunks_batches_and_class_order_do_not_change_results(model2, n, chunk):
    x, vocab = images(2, seed=2), names(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        full = model2(x, vocab)
        model2.config.class_chunk_size = chunk
        try:
            chunked = model2(x, vocab)
        finally:
            model2.config.class_chunk_size = None
        single = torch.cat([model2(x[i:i + 1], vocab) for i in range(2)])
        permuted = model2(x, [vocab[i] for i in perm])
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(permuted, full[:, perm], rtol=1e-4, atol=1e-4)


def test_padding_tokens_count_only_below_the_padding_length(model2):
    x = images(1, seed=4)
    klass = model2.layers[0].klass
    assert model2.config.class_pad_to == 12
    with torch.no_grad():
        few, many = model2(x, names(5)), model2(x, names(12))
        saved = klass.padding_tokens.clone()
        klass.padding_tokens.add_(torch.randn_like(saved))  # (a constant shift would vanish in the LayerNorm)
        try:
            few2, many2 = model2(x, names(5)), model2(x, names(12))
        finally:
            klass.padding_tokens.copy_(saved)
    assert not torch.allclose(few, few2, atol=1e-3)
    torch.testing.assert_close(many, many2, rtol=0, atol=0)


def test_first_synonym_and_single_template(model2):
    a = model2.text_embeddings(["dog, puppy", "sky"])
    b = model2.text_embeddings(["dog", "sky, heaven"])
    assert a.shape == (2, 1, 64)
    torch.testing.assert_close(a, b)
    paper = catseg.create_model("catseg_tiny").eval()
    assert not torch.allclose(paper.text_embeddings(["dog, puppy"]), paper.text_embeddings(["dog"]))


def test_raw_clip_guidance_differs_from_normalised():
    torch.manual_seed(0)
    raw = catseg.create_model("catseg2_tiny").eval()
    normalised = catseg.create_model("catseg2_tiny", clip_guidance_normalized=True).eval()
    normalised.load_state_dict(raw.state_dict())
    dense, _ = raw.clip.encode_dense(images(1), normalize=False)
    assert not torch.allclose(dense.norm(dim=1), torch.ones(1, 8, 8))
    with torch.no_grad():
        assert not torch.allclose(raw(images(1), names(3)), normalised(images(1), names(3)), atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="synonyms='last'.*mean, first"):
        get_config("catseg2_tiny", synonyms="last")
    with pytest.raises(ValueError, match="class_pad_to=-1"):
        get_config("catseg2_tiny", class_pad_to=-1)
    with pytest.raises(ValueError, match="class_pool_eval='yes' must be True or False"):
        get_config("catseg2_tiny", class_pool_eval="yes")
    with pytest.raises(ValueError, match="prompt_templates='imagenet'.*catseg2"):
        catseg.create_model("catseg2_tiny", prompt_templates="imagenet")


def test_open_clip_weights_load_into_the_split_layout(tmp_path):
    """pretrained=True reads open_clip's fused q/k/v file into the q/v-trainable split layout."""
    import open_clip
    from safetensors.torch import save_file
    from catseg.clip import clip_model_config
    from catseg.weights import clip_weights_file

    cfg = get_config("catseg2_tiny", clip_pretrained="local", weights_dir=str(tmp_path))
    torch.manual_seed(5)
    clip = open_clip.CLIP(**clip_model_config(cfg))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_weights_file(cfg, tmp_path)))
    model = catseg.create_model("catseg2_tiny", pretrained=True, clip_pretrained="local", weights_dir=str(tmp_path))
    attn = model.clip.model.visual.transformer.resblocks[1].attn
    q, k, v = clip.visual.transformer.resblocks[1].attn.in_proj_weight.chunk(3)
    assert torch.equal(attn.q_proj_weight, q) and torch.equal(attn.k_proj_weight, k)
    assert torch.equal(attn.v_proj_weight, v) and attn.q_proj_weight.requires_grad
    assert not attn.k_proj_weight.requires_grad


def test_patch_inference_runs_the_later_design(model2):
    from catseg.inference import labels_from_probs, patch_inference

    probs = patch_inference(model2, [torch.rand(3, 150, 200)], names(4))
    assert probs.shape[:2] == (1, 4) and 0 <= probs.min() and probs.max() <= 1
    assert labels_from_probs(probs, (150, 200)).shape == (1, 150, 200)
