"""The inference path (catseg/inference.py) and `catseg segment` (catseg/cli.py) checked step by step: patch
inference against the recipe written out, batches, chunked argmax ties, text-embedding cache order, input scaling,
and the outputs' records, legends, label maps and vocabularies (tiny preset, random weights, real components)."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import catseg
from catseg.inference import labels_from_probs, patch_inference, predict_labels


def _reference_patch_inference(model, image, names, size_out, at_crop=True):
    """Appendix A.3 written out step by step with F.interpolate (bilinear, align_corners=False throughout): the image
    resized to the inference size and cut into crops at the stride, plus the ORIGINAL image resized to the crop
    size; each view's fp32 logits upsampled to the crop size, then the sigmoid (`at_crop`, as the released code; else
    the sigmoid first); overlaps averaged; mosaic and global view averaged. Returns the merged map at the inference
    size and resized to `size_out`."""
    cfg = model.config
    s, size, stride = model.image_size, cfg.inference_size, cfg.inference_stride
    assert (s, size, stride) == (128, 192, 64)  # the tiny preset: crops at 0 and 64 in each direction
    offs = [0, 64]

    def bilinear(x, hw):
        return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)

    big = bilinear(image[None], (size, size))
    views = [big[..., y:y + s, x:x + s] for y in offs for x in offs] + [bilinear(image[None], (s, s))]
    with torch.no_grad():
        logits = model(torch.cat(views).clamp(0, 1), names)  # under the caller's autocast, if any
    if at_crop:
        up = torch.sigmoid(bilinear(logits.float(), (s, s)))
    else:
        up = bilinear(torch.sigmoid(logits.float()), (s, s))
    mosaic, count = torch.zeros(len(names), size, size), torch.zeros(size, size)
    for i, (y, x) in enumerate((y, x) for y in offs for x in offs):
        mosaic[:, y:y + s, x:x + s] += up[i]
        count[y:y + s, x:x + s] += 1
    merged = (mosaic / count + bilinear(up[-1:], (size, size))[0]) / 2
    return merged, bilinear(merged[None], size_out)[0]


@pytest.mark.parametrize("at_crop", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_patch_inference_matches_the_recipe_step_by_step_on_a_non_square_image(tiny_model, bf16, at_crop):
    """On a non-square image of neither the crop nor the inference size (so every resize matters: the square test
    images of test_patch_inference_mosaic_is_exact are symmetric ramps at the inference size, where another
    interpolation mode, align_corners or a global view taken from the resized image give the same numbers),
    patch_inference, the class scores and the label map of predict_labels equal the recipe computed step by step:
    crops of the image resized to the inference size, the global view resized from the original image, bilinear
    with align_corners=False, sigmoid, overlaps averaged, mosaic and global view averaged, resized, argmax. Under
    bf16 autocast the sigmoid takes the logits cast to fp32 (probabilities of bf16's 8-bit precision would round
    0.998 and above to 1.0 and tie confident classes). Both orders of the sigmoid and the upsampling to the crop
    size (`config.sigmoid_at_crop_size`: after, as the released code, by default)."""
    import copy

    model = copy.deepcopy(tiny_model)
    model.config.sigmoid_at_crop_size = at_crop
    image = torch.rand(3, 75, 110, generator=torch.Generator().manual_seed(21))
    names = ["sky", "tree", "road", "car", "person"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        merged, full = _reference_patch_inference(model, image, names, (75, 110), at_crop)
        probs = patch_inference(model, image[None], names)[0]
        labels, scores = predict_labels(model, [image], names)
        other, _ = _reference_patch_inference(model, image, names, (75, 110), not at_crop)
    torch.testing.assert_close(probs, merged, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[0], merged.mean(dim=(1, 2)), rtol=0, atol=1e-5)
    top2 = full.topk(2, dim=0).values
    clear = top2[0] - top2[1] > 1e-4  # pixels whose winner no rounding difference can change
    assert clear.float().mean() > 0.9
    assert torch.equal(labels[0][clear], full.argmax(dim=0)[clear])
    assert (other - merged).abs().max() > 1e-3  # the two orders give other probabilities


def test_each_image_of_a_batch_gets_its_own_labels_and_scores(tiny_model):
    """predict_labels on a list of images (two of one size, merged together; then with one of another size first)
    returns for each image the label map and class scores it gets alone, not those of another image of the
    batch."""
    g = torch.Generator().manual_seed(5)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 70), indexing="ij")
    images = {"noise": torch.rand(3, 50, 70, generator=g), "ramp": torch.stack([xs, ys, 1 - xs]),
              "wide": torch.rand(3, 40, 90, generator=g)}
    names = ["sky", "tree", "road", "car"]
    alone = {k: predict_labels(tiny_model, [im], names) for k, im in images.items()}
    # the images are told apart: another image's labels or scores would show
    assert (alone["noise"][0][0] == alone["ramp"][0][0]).float().mean() < 0.5
    assert (alone["noise"][1] - alone["ramp"][1]).abs().max() > 1e-3
    for order in (["noise", "ramp"], ["wide", "ramp", "noise"]):  # one size (merged together); two sizes
        labels, scores = predict_labels(tiny_model, [images[k] for k in order], names)
        assert scores.shape == (len(order), len(names))
        for k, lab, sc in zip(order, labels, scores):
            assert lab.shape == images[k].shape[1:]
            assert (lab == alone[k][0][0]).float().mean() > 0.99, k
            torch.testing.assert_close(sc, alone[k][1][0], rtol=0, atol=1e-5)


def test_chunked_argmax_breaks_ties_as_argmax_does():
    """Classes whose probabilities are equal (two classes saturated at exactly 1.0 in fp32, say) keep the earlier
    class whatever the class chunks, as argmax over all classes at once does: the label map must not depend on
    --class-chunk. Ties here fall inside one chunk and across chunk boundaries."""
    probs = torch.full((2, 10, 6, 5), 0.25)
    probs[0, 2], probs[0, 7] = 1.0, 1.0  # across chunks of 3, 5 and 7
    probs[1, 4], probs[1, 5], probs[1, 9] = 0.75, 0.75, 0.75
    full = probs.argmax(dim=1)
    assert full[0].eq(2).all() and full[1].eq(4).all()
    for chunk in (1, 2, 3, 5, 7, 10):
        assert torch.equal(labels_from_probs(probs, (6, 5), chunk=chunk), full), chunk


def test_segmenter_predictions_name_the_classes_as_stripped(tiny_model):
    """Segmenter.predict compares class names without surrounding spaces (" sky" and "sky" are one class) and
    returns them stripped: Prediction.class_names and the keys of areas() are the names a caller looks up."""
    import copy

    seg = catseg.Segmenter(copy.deepcopy(tiny_model), device="cpu")
    pred = seg.predict(np.zeros((20, 30, 3), np.uint8), [" sky", "tree ", " road "])[0]
    assert pred.class_names == ["sky", "tree", "road"]
    assert set(pred.areas()) <= {"sky", "tree", "road"} and abs(sum(pred.areas().values()) - 1) < 1e-9


# ---- catseg segment (catseg/cli.py)


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-proposed")
    torch.manual_seed(0)
    catseg.save_weights(catseg.create_model("catseg_tiny"), d / "tiny.safetensors")
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(d / "a.png")
    return d


def test_segment_record_and_overlay_show_the_images_prediction(cli_workspace):
    """The JSON record and the overlay of `catseg segment` are those of the image's prediction: "size" is
    [height, width] as the label map's shape, each class's score is filed under its own name (what catseg.Segmenter
    gives for the image with these weights), and the overlay's image part is the photo (0..255) blended half and
    half with the palette colour of each pixel's class."""
    from catseg import cli

    ws, names = cli_workspace, ["cat", "dog", "grass", "sky"]
    out = ws / "o-record"
    assert cli.main(["segment", str(ws / "a.png"), "--classes", ", ".join(names), "--checkpoint",
                     str(ws / "tiny.safetensors"), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    record = json.loads((out / "a.json").read_text())
    labels = np.array(Image.open(out / "a_labels.png"))
    assert record["size"] == [45, 70] == list(labels.shape)
    pred = catseg.Segmenter(catseg.create_model("catseg_tiny", pretrained=ws / "tiny.safetensors"),
                            device="cpu").predict(ws / "a.png", names)[0]
    assert list(record["scores"]) == names and np.ptp(pred.scores) > 1e-4  # scores told apart by name
    np.testing.assert_allclose([record["scores"][n] for n in names], pred.scores, rtol=0, atol=1e-6)
    photo = np.asarray(Image.open(ws / "a.png").convert("RGB")).astype(np.float32)
    expected = 0.5 * photo + 0.5 * cli.palette(len(names))[labels].astype(np.float32)
    overlay = np.asarray(Image.open(out / "a_overlay.png").convert("RGB")).astype(np.float32)
    assert np.abs(overlay[:45, :70] - expected).max() <= 1


def test_overlay_legend_shows_the_classes_present_only():
    """The overlay's legend has a colour swatch for each class present in the label map and none for the others."""
    from catseg import cli

    labels = np.zeros((30, 40), np.int64)
    labels[:, 20:] = 2
    names = ["cat", "dog", "grass", "sky"]
    canvas = np.asarray(cli.overlay_with_legend(np.full((30, 40, 3), 128, np.uint8), labels, names))
    panel, colors = canvas[:, 40:], cli.palette(len(names))
    shown = [int((panel == colors[i]).all(-1).sum()) >= 100 for i in range(len(names))]  # an 11x11 swatch fill
    assert shown == [True, False, True, False]


@pytest.mark.parametrize("n", [256, 257])
def test_label_map_png_keeps_every_class_id(tmp_path, n):
    """The label map PNG stores each pixel's class id exactly: 8-bit up to 256 classes (ids 0..255), 16-bit beyond,
    where 8 bits would wrap id 256 to 0."""
    from catseg.cli import write_outputs
    from catseg.inference import Prediction

    labels = np.zeros((8, 9), np.int64)
    labels[0, 0], labels[1] = n - 1, 5
    names = [f"class {i}" for i in range(n)]
    write_outputs(tmp_path, "x", tmp_path / "x.png", torch.rand(3, 8, 9), Prediction(labels, np.zeros(n), names),
                  names)
    with Image.open(tmp_path / "x_labels.png") as im:
        assert im.mode == ("L" if n <= 256 else "I;16")
        np.testing.assert_array_equal(np.array(im), labels)


def test_classes_option_takes_a_trailing_or_doubled_comma(cli_workspace, capsys):
    """--classes "cat,, dog," names two classes: empty items between commas are dropped, not refused as blank
    names (the run below stops at its missing input, after the vocabulary checks and before the model loads)."""
    from catseg.cli import main, parse_classes

    assert parse_classes("cat,, dog, ") == ["cat", "dog"]
    code = main(["segment", str(cli_workspace / "missing.jpg"), "--classes", "cat,, dog,", "--checkpoint",
                 str(cli_workspace / "tiny.safetensors"), "--out", str(cli_workspace / "o-commas")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.jpg' does not exist" in err and "class names" not in err


def test_segment_takes_65536_classes(cli_workspace, capsys):
    """Class ids 0..65535 fit the 16-bit label map, so 65536 classes pass the class-count check (65537 do not, see
    test_segment_bad_input); the run below stops at its missing input instead."""
    from catseg.cli import main

    code = main(["segment", str(cli_workspace / "missing.jpg"), "--classes", ", ".join(f"c{i}" for i in range(65536)),
                 "--checkpoint", str(cli_workspace / "tiny.safetensors"), "--out", str(cli_workspace / "o-65536")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.jpg' does not exist" in err and "classes" not in err


def test_benchmark_vocabularies_come_stripped_and_synonym_lines_do_not_warn(tmp_path):
    """--vocab ade150 gives its names without the reference list's stray spaces ("bed " is "bed" in the outputs),
    and a vocabulary file of several lines, some with synonyms, loads without the one-line warning."""
    from catseg.cli import load_vocabulary

    ade = load_vocabulary("ade150")
    assert len(ade) == 150 and "bed" in ade and all(n == n.strip() for n in ade)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("sofa, couch\ncat\ntv, television\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_vocabulary(str(vocab)) == ["sofa, couch", "cat", "tv, television"]


def test_a_reordered_vocabulary_gets_its_own_text_embeddings(tiny_model):
    """The text-embedding cache is keyed by the vocabulary in its order: the same names in another order get their
    embeddings in that order, and labels and scores follow the names (embeddings cached for the first order would
    silently swap the classes)."""
    first, again = ["cat", "dog", "grass"], ["grass", "cat", "dog"]
    a, b = tiny_model.text_embeddings(first), tiny_model.text_embeddings(again)
    torch.testing.assert_close(b, a[[2, 0, 1]], rtol=0, atol=0)
    image = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(9))
    la, sa = predict_labels(tiny_model, [image], first)
    lb, sb = predict_labels(tiny_model, [image], again)
    new_index = torch.tensor([1, 2, 0])  # cat, dog, grass in the second order
    assert (lb[0] == new_index[la[0]]).float().mean() > 0.99
    torch.testing.assert_close(sb[0], sa[0][[2, 0, 1]], rtol=0, atol=1e-5)


def test_uint8_batches_are_scaled_also_when_the_model_skips_its_range_check(tiny_model):
    """A uint8 (B, 3, H, W) batch is scaled by 255 whether or not the model checks float inputs' range
    (check_inputs off, as the bench and the trainer set it): same probabilities as the float batch / 255."""
    import copy

    model = copy.deepcopy(tiny_model)
    model.check_inputs = False
    batch = torch.randint(0, 256, (1, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    names = ["cat", "dog"]
    torch.testing.assert_close(patch_inference(model, batch, names), patch_inference(model, batch.float() / 255, names),
                               rtol=0, atol=1e-6)


def test_segment_skips_other_files_of_an_output_folder_inside_the_input_folder(cli_workspace, capsys):
    """An output folder inside the input folder is left out of the inputs whole: an image the user keeps there
    (not written by catseg) is not segmented as one of the folder's photos."""
    from catseg.cli import main

    folder = cli_workspace / "photos"
    (folder / "seg").mkdir(parents=True)
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "p.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "seg" / "notes.jpg")
    assert main(["segment", str(folder), "--classes", "cat, dog", "--checkpoint",
                 str(cli_workspace / "tiny.safetensors"), "--out", str(folder / "seg"), "--device", "cpu",
                 "--quiet"]) == 0
    assert "segmented 1/1 images" in capsys.readouterr().out
    assert not (folder / "seg" / "notes.json").exists()
