"""Training building blocks in-process: config validation, schedule, optimizer groups, loss, data stream,
checkpoint layout, tracking fallback, SLURM command generation (the .sbatch scripts run with a stand-in srun)."""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_training_fixtures import PYTHON, REPO, free_port, write_synthetic
from training import checkpoint as ckpt
from training.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from training.criterion import PixelBCECriterion
from training.data import (PAD_RGB, AugmentConfig, DataError, ShardStream, StreamState, augment, make_loader,
                           open_shards, photometric_jitter)
from training.dist import world_info_from_env
from training.optim import build_optimizer, lr_factor, norm_parameters, param_groups
from training.slurm_cmd import accelerate_command, expand_hostlist, node_launch_from_env
from training.train import deepspeed_precision, main as train_main, micro_batch_size


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("shards"), train=48, val=8, shard_size=12)


# -- config -------------------------------------------------------------------------------------------------------


def test_every_run_config_loads_with_a_known_preset_and_the_paper_recipe():
    import catseg

    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"quickstart", "catseg_vitb16_r101", "catseg_vitl14_swinb",
                                       "catseg_vith14_swinb", "catseg_vitg14_swinb"}
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.preset in catseg.list_models(), path
        if path.stem != "quickstart":
            assert (cfg.train.steps, cfg.train.batch_size, cfg.data.crop_size) == (80000, 4, 384), path
            assert (cfg.optim.lr, cfg.optim.clip_lr, cfg.optim.weight_decay) == (2e-4, 2e-6, 1e-4), path
            assert cfg.schedule.name == "cosine" and cfg.schedule.warmup_steps == 0, path
        # the measured GPU configs train compiled and channels-last (benchmarks/results/h100_2026-11-26b,
        # h200_2026-11-26c)
        measured = path.stem in {"catseg_vitb16_r101", "catseg_vitl14_swinb"}
        assert cfg.train.compile == measured and cfg.train.channels_last == measured, path


@pytest.mark.parametrize("override, needle", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'; valid keys in 'optim': lr, clip_lr"),
    (["trian.steps=5"], "unknown key 'trian'"),
    (["train.steps=ten"], "train.steps = 'ten' has the wrong type; expected an integer"),
    (["optim.lr=fast"], "optim.lr = 'fast' has the wrong type; expected a number"),
    (["data.hflip=1"], "data.hflip = 1 has the wrong type; expected true or false"),
    (["schedule.name=step"], "schedule.name = 'step'; choose one of: cosine, poly, constant"),
    (["train.steps=10", "schedule.warmup_steps=20"], "schedule.warmup_steps = 20 exceeds train.steps = 10"),
    (["train.batch_size=6", "train.grad_accum=4"], "train.batch_size = 6 is not divisible by train.grad_accum = 4"),
    (["data.scale_range=[2.0]"], "data.scale_range = [2.0]; expected a list of 2 values"),
    (["steps"], "expected KEY=VALUE"),
    (["train.compile_scope=clip"], "train.compile_scope = 'clip'; choose one of: model, aggregation"),
    (["train.compile_mode=fast"], "train.compile_mode = 'fast'; choose one of: '', default, reduce-overhead"),
    (["train.stencil_upsampling=true"], "train.stencil_upsampling = true acts on compiled code only; set "
                                        "train.compile: true as well"),
    (["model.overrides.num_layer=1"], "model.overrides {'num_layer': 1}: unknown model config field(s) ['num_layer']"),
    (["model.overrides.num_layers=one"], "num_layers='one' must be an integer >= 0"),
    (["model.overrides=3"], "model.overrides = 3 has the wrong type; expected a mapping of names to values"),
    (["model.overrides.name=catseg_vitb16_r101"],
     "model.overrides.name: a model's name is its preset; set model.preset"),
    (["model.overrides.weights_dir=/w"], "model.overrides.weights_dir: set model.weights_dir instead"),
])
def test_bad_config_values_are_errors_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "quickstart.yaml", override)
    assert needle in str(err.value)
    assert "quickstart.yaml" in str(err.value) or override == ["steps"]


def test_unknown_key_in_a_config_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: catseg_tiny\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.colour'"):
        load_config(path)
    with pytest.raises(ConfigError, match="run config .*missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")


def test_numbers_in_scientific_notation_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; a float key takes it as the number it spells, in a file and in
    --set alike, and a word is still refused."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: catseg_tiny\noptim:\n  lr: 2e-4\n  weight_decay: 1E-4\n")
    cfg = load_config(path, ["optim.clip_lr=2e-6"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_lr) == (2e-4, 1e-4, 2e-6)
    with pytest.raises(ConfigError, match="optim.lr = '2e-4x' has the wrong type; expected a number"):
        load_config(path, ["optim.lr=2e-4x"])


def test_global_batch_splits_over_processes_and_accumulation_or_fails():
    cfg = load_config(None, ["train.batch_size=8", "train.grad_accum=2"])
    assert micro_batch_size(cfg, 2) == 2
    with pytest.raises(ConfigError, match="does not split over 3 processes x 2 accumulation steps; use a multiple of 6"):
        micro_batch_size(cfg, 3)


@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3"])
def test_the_launch_configs_split_every_run_config_batch(launch):
    import yaml

    processes = yaml.safe_load((REPO / "launch" / f"{launch}.yaml").read_text())["num_processes"]
    for config in sorted((REPO / "configs").glob("*.yaml")):
        micro_batch_size(load_config(config, []), processes)  # the README's launch commands, as written


# -- schedule, optimizer, loss ---------------------------------------------------------------------------------------


def test_learning_rate_schedules():
    cos = ScheduleConfig(name="cosine")
    assert lr_factor(0, 100, cos) == 1.0 and lr_factor(50, 100, cos) == pytest.approx(0.5)
    assert lr_factor(100, 100, cos) == pytest.approx(0.0, abs=1e-12)
    warm = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, 110, warm) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(60, 110, warm) == pytest.approx(0.1 + 0.9 * 0.5)
    poly = ScheduleConfig(name="poly", power=0.9)
    assert lr_factor(50, 100, poly) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(70, 100, ScheduleConfig(name="constant")) == 1.0


def test_optimizer_groups_separate_learning_rates_and_no_decay_for_norms_only():
    import catseg

    model = catseg.create_model("catseg_tiny")
    model.set_clip_trainable("attention")
    norms = norm_parameters(model)
    groups = param_groups(model.parameter_groups(), OptimConfig(lr=1e-3, clip_lr=1e-5, backbone_lr=1e-4,
                                                                weight_decay=0.05), norms)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"clip", "backbone", "backbone.no_decay", "head", "head.no_decay"}  # CLIP trains no norm
    assert [by_name[k]["lr"] for k in ("clip", "backbone", "head")] == [1e-5, 1e-4, 1e-3]
    for name, group in by_name.items():
        assert all((id(p) in norms) == name.endswith("no_decay") for p in group["params"]), name
        assert group["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.05)
    decayed = {id(p) for g in groups if not g["name"].endswith("no_decay") for p in g["params"]}
    named = dict(model.named_parameters())
    # the recipe spares the norms only: biases, the CLIP attention biases included, are decayed
    assert id(named["layers.0.spatial.blocks.0.attn.q.bias"]) in decayed
    assert id(named["clip.model.visual.transformer.resblocks.0.attn.in_proj_bias"]) in decayed
    assert id(named["layers.0.spatial.blocks.0.norm1.weight"]) in norms
    assert id(named["decoder.0.conv.1.weight"]) in norms and isinstance(model.decoder[0].conv[1], torch.nn.GroupNorm)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    optimizer = build_optimizer(model, OptimConfig(backbone_lr=0.0))
    assert "backbone" not in {g["name"] for g in optimizer.param_groups}  # lr 0 = not optimised at all


def test_fused_optimizer_steps_equal_the_per_parameter_adamw():
    import catseg

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny")
    model.set_clip_trainable("attention")
    cfg = OptimConfig(lr=1e-3, clip_lr=1e-4, backbone_lr=1e-4, weight_decay=0.05)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused = build_optimizer(model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    named = model.parameter_groups()
    plain_params = {n: p.detach().clone().requires_grad_(True) for group in named.values() for n, p in group}
    live_norms = norm_parameters(model)
    norms = {id(plain_params[n]) for n, p in model.named_parameters() if n in plain_params and id(p) in live_norms}
    plain = torch.optim.AdamW(param_groups({k: [(n, plain_params[n]) for n, _ in v] for k, v in named.items()}, cfg,
                                           norms),
                              betas=cfg.betas, eps=cfg.eps, foreach=False)
    live = dict(model.named_parameters())
    for step in range(3):
        for n, p in plain_params.items():
            grad = torch.randn_like(p)
            p.grad, live[n].grad = grad, grad.clone()
        fused.step()
        plain.step()
    moved = 0
    for n, p in plain_params.items():
        torch.testing.assert_close(live[n].detach(), p.detach(), rtol=1e-5, atol=1e-7, msg=n)
        moved += not torch.equal(live[n].detach(), reference[n])
    assert moved == len(plain_params)  # every trainable parameter took the steps


def test_pixel_bce_masks_ignore_pixels_or_uses_zero_targets():
    logits = torch.tensor([[[[2.0, -1.0]]], [[[0.5, 3.0]]]]).permute(1, 0, 2, 3)  # (1, 2 classes, 1, 2)
    labels = torch.tensor([[[1, 255]]])
    bce = lambda x, t: -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
    masked = (bce(2.0, 0) + bce(0.5, 1)) / 2
    unmasked = (bce(2.0, 0) + bce(0.5, 1) + bce(-1.0, 0) + bce(3.0, 0)) / 4
    assert PixelBCECriterion(255, mask_ignore=True)(logits, labels).item() == pytest.approx(masked, rel=1e-6)
    assert PixelBCECriterion(255, mask_ignore=False)(logits, labels).item() == pytest.approx(unmasked, rel=1e-6)
    # logits at a quarter of the label size are upsampled to it
    loss = PixelBCECriterion(255)(torch.zeros(2, 3, 4, 4), torch.zeros(2, 16, 16, dtype=torch.long))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    # each image weighs the same, however many of its pixels are labelled: the batch's loss is the mean of the
    # images' losses, so it does not change with how a batch is split into micro-batches
    logits, labels = torch.randn(3, 4, 5, 5), torch.randint(0, 4, (3, 5, 5))
    labels[0, 1:] = 255  # most of the first image is padding
    criterion = PixelBCECriterion(255)
    alone = torch.stack([criterion(logits[i:i + 1], labels[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(criterion(logits, labels), alone.mean())
    labels[2] = 255  # nothing labelled: the image adds nothing and still counts
    torch.testing.assert_close(criterion(logits, labels), alone[:2].sum() / 3)


# -- data ---------------------------------------------------------------------------------------------------------------


def test_augment_resizes_crops_and_pads_label_with_ignore_keeping_integer_ids():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    label = np.full((60, 90), 846, np.int64)
    label[:, 45:] = 65534  # 16-bit ids survive the resize exactly (no float decoding)
    cfg = AugmentConfig(crop_size=64, short_side=40, jitter=True, hflip=True, ignore_index=65535)
    out_image, out_label = augment(image, label, cfg, np.random.default_rng(1))
    assert out_image.shape == (64, 64, 3) and out_image.dtype == np.uint8 and out_label.shape == (64, 64)
    assert set(np.unique(out_label)) == {846, 65534, 65535}
    assert (out_label[40:] == 65535).all()  # short side 40 < crop 64: label padded with ignore
    again = augment(image, label, cfg, np.random.default_rng(1))
    assert np.array_equal(again[0], out_image) and np.array_equal(again[1], out_label)
    # the padding comes last, as in the release: bottom and right, never jittered or flipped
    for seed in range(8):
        out_image, out_label = augment(image, label, cfg, np.random.default_rng(seed))
        assert (out_image[40:] == PAD_RGB).all() and (out_image[:, 60:] == PAD_RGB).all(), seed
        assert (out_label[:, 60:] == 65535).all() and (out_label[:40, :60] != 65535).all(), seed


class _Draws:
    """Stands in for the random generator of photometric_jitter: these coins and values."""

    def __init__(self, coins, brightness=0.0, contrast=1.0, saturation=1.0, hue=0):
        self.coins, self.uniforms, self.hue = np.array(coins), [brightness, contrast, saturation], hue

    def random(self, n):
        return self.coins[:n]

    def uniform(self, low, high):
        return self.uniforms.pop(0)

    def integers(self, low, high):
        return self.hue


def test_photometric_jitter_is_the_releases():
    """detectron2's ColorAugSSDTransform: the saturation scales HSV's S (brightness kept), the hue moves by OpenCV's
    2-degree steps (+-18 of them: +-36 degrees)."""
    import colorsys

    red = np.full((2, 2, 3), (200, 40, 40), np.uint8)
    no, yes = 0.9, 0.1
    out = photometric_jitter(red, _Draws([no, no, yes, no, no], saturation=0.5))
    np.testing.assert_allclose(out[0, 0], (200, 120, 120), atol=2)  # not a blend with grey: (144, 64, 64)
    out = photometric_jitter(red, _Draws([no, no, no, yes, no], hue=18))
    h, s, v = colorsys.rgb_to_hsv(*(np.array((200, 40, 40)) / 255))
    np.testing.assert_allclose(out[0, 0], np.array(colorsys.hsv_to_rgb(h + 36 / 360, s, v)) * 255, atol=3)
    out = photometric_jitter(red, _Draws([yes, yes, no, no, yes], brightness=80.0, contrast=1.5))
    assert tuple(out[0, 0]) == (255, 180, 180)  # each step clipped: (200 + 80) -> 255, then x1.5 -> 255


def _batches(shards, seed=0, rank=0, world=1, workers=2, positions=None, rotation=0, count=10):
    stream = ShardStream(shards, AugmentConfig(64, 64, (0.8, 1.2)), 3, seed, rank, world, workers, shuffle=8,
                         positions=positions, rotation=rotation)
    return list(itertools.islice(make_loader(stream, workers), count))


def test_stream_is_deterministic_per_seed_split_by_rank_and_resumes_exactly(synthetic):
    shards = open_shards(synthetic / "train")
    first = _batches(shards)
    assert all(b["images"].shape == (3, 3, 64, 64) and b["labels"].dtype == torch.int32 for b in first)
    same = lambda a, b: torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert all(same(a, b) for a, b in zip(first, _batches(shards)))
    assert not same(first[0], _batches(shards, seed=1, count=1)[0])
    assert not same(first[0], _batches(shards, rank=1, world=2, count=1)[0])
    state = StreamState(2, 0, 1)
    for batch in first[:5]:  # an odd count: the next batch comes from the second loader worker
        state.update(batch)
    restored = StreamState(2, 0, 1)
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    rest = _batches(shards, positions=restored.positions, rotation=restored.rotation, count=5)
    assert all(same(a, b) for a, b in zip(first[5:], rest))


def test_missing_shard_folder_names_the_data_prep_command(tmp_path):
    with pytest.raises(DataError) as err:
        open_shards(tmp_path / "coco_stuff" / "train")
    assert f"python -m data_prep.convert coco_stuff --root <raw coco_stuff folder> --out {tmp_path}" in str(err.value)
    with pytest.raises(DataError, match=f"python -m data_prep.synthetic --out {tmp_path}"):
        open_shards(tmp_path / "synthetic" / "train")


def _shard_folder(root: Path, samples_per_shard: list[list[dict]]) -> Path:
    from data_prep import shards

    folder = root / "toy" / "train"
    folder.mkdir(parents=True)
    records = [shards.write_shard(folder / shards.shard_name("toy", "train", i), i, samples)
               for i, samples in enumerate(samples_per_shard)]
    shards.finalize_folder(folder, {"name": "toy", "split": "train", "class_names": ["a", "b"], "num_classes": 2,
                                    "ignore_index": 255, "label_dtype": "uint8"}, records)
    return folder


def _sample(i: int, image_bytes: bytes | None = None) -> dict:
    import io

    from PIL import Image

    from data_prep import shards

    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 1
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(buf, format="JPEG")
    return shards.build_sample(f"toy_train_{i:04d}", image_bytes or buf.getvalue(), "jpg", label, label_dtype="uint8",
                               ignore_index=255, class_list="toy", source={})


def test_a_listed_shard_that_is_gone_is_named(tmp_path):
    folder = _shard_folder(tmp_path, [[_sample(0)], [_sample(1)]])
    (folder / "toy-train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"training shards in .* are incomplete: .*sizes.json lists toy-train-000001.tar "
                                        r"but .*toy-train-000001.tar does not exist"):
        open_shards(folder)


@pytest.mark.parametrize("damage", ["zero bytes", "no members"])
def test_empty_shard_is_a_clear_error(tmp_path, damage):
    import tarfile

    folder = _shard_folder(tmp_path, [[_sample(0), _sample(1)], [_sample(2), _sample(3)]])
    shard = folder / "toy-train-000001.tar"
    shard.chmod(0o644)
    if damage == "zero bytes":
        shard.write_bytes(b"")
    else:
        tarfile.open(shard, "w").close()
    with pytest.raises(DataError, match=r"shard .*toy-train-000001.tar is empty \(0 samples\)"):
        open_shards(folder)


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    folder = _shard_folder(tmp_path, [[_sample(0), _sample(1, b"not a jpeg at all"), _sample(2), _sample(3)]])
    shards = open_shards(folder)
    stream = ShardStream(shards, AugmentConfig(32, 32, jitter=False, hflip=False), 1, 0, 0, 1, 0, shuffle=1)
    batches = list(itertools.islice(iter(stream), 6))
    assert len(batches) == 6 and max(b["corrupt"] for b in batches) == 2  # the shard is drawn twice in 6 samples
    assert "toy_train_0001" in caplog.text and "cannot be decoded" in caplog.text
    state = StreamState(0, 0, 1)
    for batch in batches:
        state.update(batch)
    assert state.corrupt == 2


# -- checkpoints -------------------------------------------------------------------------------------------------


def _fake_checkpoint(run_dir: Path, step: int, preset: str = "catseg_tiny") -> Path:
    path = run_dir / "checkpoints" / ckpt.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "preset": preset, "mlflow_run_id": None,
                                                "mlflow_tracking_uri": None, "created": "now"}))
    return path


def test_checkpoint_listing_ignores_partial_folders_and_prunes_oldest(tmp_path):
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.resolve_resume(tmp_path, "none") is None
    for step in (300, 100, 2000):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".tmp-step_00003000").mkdir()
    (tmp_path / "checkpoints" / "step_00004000").mkdir()  # no meta.json: not complete
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000100", "step_00000300", "step_00002000"]
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path))["step"] == 2000
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_00002000"
    # a new run in a folder with checkpoints: the earlier run's higher steps would outlive the new ones
    with pytest.raises(ckpt.CheckpointError, match=r"--resume none starts a new run, but run folder .* holds "
                                                   r"checkpoints of an earlier one \(newest step_00002000\)"):
        ckpt.resolve_resume(tmp_path, "none")
    # going back to an older checkpoint of the folder: the later one would win the next --resume auto
    with pytest.raises(ckpt.CheckpointError, match=r"resuming .*step_00000300 \(step 300\) in run folder .*, which "
                                                   r"holds later checkpoints \(step_00002000\)"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_00000300"))
    assert ckpt.resolve_resume(tmp_path / "new-run", str(tmp_path / "checkpoints" / "step_00000300")).name == \
        "step_00000300"
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000300", "step_00002000"]
    # a save of the same step killed between its two renames: the replaced checkpoint comes back, before the
    # resume point is chosen
    os.replace(tmp_path / "checkpoints" / "step_00002000", tmp_path / "checkpoints" / ".old-step_00002000")
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_00002000"
    os.replace(tmp_path / "checkpoints" / "step_00002000", tmp_path / "checkpoints" / ".old-step_00002000")
    ckpt.remove_partial(tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000300", "step_00002000"]
    ckpt.remove_partial(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-step_00003000").exists()
    with pytest.raises(ckpt.CheckpointError, match="meta.json is missing"):
        ckpt.read_meta(tmp_path / "checkpoints" / "step_00004000")


def test_resume_between_log_steps_keeps_the_logged_losses_and_rates(tmp_path, synthetic):
    """A checkpoint at step 3 of a 4-step log window: the resumed run's log at step 4 averages steps 1-4 as the
    uninterrupted run's does, and each log names the learning rate its step used."""
    from test_training_fixtures import base_env, metrics

    def train(run_dir, *extra):
        subprocess.run([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir", str(run_dir),
                        "--set", f"data.root={synthetic / 'train'}", "train.steps=8", "train.log_every=4",
                        "train.ckpt_every=3", "train.keep_last=5", "schedule.name=cosine",
                        "schedule.warmup_steps=0", "data.workers=0", *extra],
                       cwd=REPO, env=base_env(), check=True, capture_output=True, timeout=300)
        return {m["step"]: m for m in metrics(run_dir)}

    whole = train(tmp_path / "whole")
    resumed = train(tmp_path / "resumed", "--resume", str(tmp_path / "whole" / "checkpoints" / "step_00000003"))
    assert sorted(whole) == [4, 8] and sorted(resumed) == [4, 8]
    for step in (4, 8):
        assert resumed[step]["loss"] == whole[step]["loss"], step
    # an optimizer state with other parameter groups (a checkpoint of an earlier grouping) is refused by name
    state = tmp_path / "whole" / "checkpoints" / "step_00000006" / "state" / "optimizer.bin"
    saved = torch.load(state, weights_only=True)
    saved["param_groups"] = saved["param_groups"][:-1]
    torch.save(saved, state)

    def resume(checkpoint: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "old"),
             "--set", f"data.root={synthetic / 'train'}", "train.steps=8", "data.workers=0", "schedule.warmup_steps=0",
             "--resume", str(checkpoint)], cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)

    refused = resume(state.parents[1])
    assert refused.returncode == 2
    assert "its optimizer state has other parameter groups than this version builds" in refused.stderr
    # a damaged state file, and a checkpoint without its state, are named with what to do instead of a traceback
    state = tmp_path / "whole" / "checkpoints" / "step_00000003" / "state"
    (state / "optimizer.bin").write_bytes((state / "optimizer.bin").read_bytes()[:200])
    refused = resume(state.parent)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"{state} cannot be read" in refused.stderr and "damaged or incomplete" in refused.stderr
    for f in state.glob("train_rank*.json"):
        f.unlink()
    refused = resume(state.parent)
    assert refused.returncode == 2
    assert f"{state.parent} holds no training state" in refused.stderr
    assert f"--set model.pretrained={state.parent / 'model.safetensors'}" in refused.stderr
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["schedule.name=cosine", "schedule.warmup_steps=0"])
    for step in (4, 8):  # the rate of optimizer step `step` (0-based step - 1), not of the next one
        expected = cfg.optim.lr * lr_factor(step - 1, 8, cfg.schedule)
        assert math.isclose(whole[step]["lr/head"], expected, rel_tol=1e-9), (step, whole[step]["lr/head"], expected)


def test_resuming_with_a_process_count_that_cannot_continue_is_refused(tmp_path):
    """Fewer processes than wrote a checkpoint continue it (their data streams restart); more have no state for the
    new ones, and DeepSpeed's sharded optimizer state needs the same count: refused on every process before
    anything is written, with what to do instead."""
    path = _fake_checkpoint(tmp_path, 10)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(dict(meta, world_size=2)))
    for count in (1, 2):
        assert ckpt.check_compatible(path, "catseg_tiny", count)["world_size"] == 2
    assert ckpt.check_compatible(path, "catseg_tiny", 2, deepspeed=True)["step"] == 10
    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 processes and this run has 4: processes 2..3 "
                                                   r"would have no training state. Resume with 2 processes"):
        ckpt.check_compatible(path, "catseg_tiny", 4)
    with pytest.raises(ckpt.CheckpointError, match=r"has 1: its DeepSpeed optimizer state is split over those "
                                                   r"processes.*model.pretrained=.*model.safetensors"):
        ckpt.check_compatible(path, "catseg_tiny", 1, deepspeed=True)


def test_resuming_a_checkpoint_of_another_preset_is_refused(tmp_path, synthetic, capsys):
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, 50, preset="catseg_vitb16_r101")
    code = train_main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--run-dir", str(run_dir),
                       "--set", f"data.root={synthetic / 'train'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds preset 'catseg_vitb16_r101' but this run builds 'catseg_tiny'" in err


def test_pretrained_weights_of_another_preset_are_refused(tmp_path, synthetic, capsys):
    import catseg

    other = catseg.save_weights(catseg.create_model("catseg2_tiny"), tmp_path / "other.safetensors")
    code = train_main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--run-dir", str(tmp_path / "run"),
                       "--set", f"data.root={synthetic / 'train'}", f"model.pretrained={other}"])
    err = capsys.readouterr().err
    assert code == 2 and "preset 'catseg2_tiny', not 'catseg_tiny'" in err
    missing = tmp_path / "missing.safetensors"
    code = train_main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--run-dir", str(tmp_path / "run"),
                       "--set", f"data.root={synthetic / 'train'}", f"model.pretrained={missing}"])
    assert code == 2 and f"weights file '{missing}' does not exist" in capsys.readouterr().err


def _train_in_process(run_dir: Path, synthetic: Path, *sets: str) -> int:
    """The quickstart config on the synthetic shards in this process, no warm-up, no loader workers; its exit code."""
    return train_main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--run-dir", str(run_dir), "--set",
                       f"data.root={synthetic / 'train'}", "schedule.warmup_steps=0", "data.workers=0", *sets])


def test_an_ablation_trains_from_model_overrides_and_its_weights_rebuild_it(tmp_path, synthetic):
    """The paper's ablations train from the run config (`model.overrides`); the checkpoint's weights record them, so
    create_model and the evaluation build the ablated model from the weights alone."""
    import catseg
    from catseg.weights import read_overrides
    from evaluation.evaluate import main as eval_main

    run_dir = tmp_path / "run"
    assert _train_in_process(run_dir, synthetic, "train.steps=2", "model.overrides.num_layers=1",
                             "model.overrides.class_aggregation=false",
                             "model.overrides.decoder_guidance_dims=[4, 4]") == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["overrides"] == {
        "num_layers": 1, "class_aggregation": False, "decoder_guidance_dims": [4, 4]}
    last = ckpt.latest_checkpoint(run_dir)
    weights = last / "model.safetensors"
    assert read_overrides(weights) == {"num_layers": 1, "class_aggregation": False, "decoder_guidance_dims": [4, 4]}
    model = catseg.create_model("catseg_tiny", pretrained=last)
    assert len(model.layers) == 1 and model.layers[0].klass is None and model.config.decoder_guidance_dims == (4, 4)
    with pytest.raises(ValueError, match=r"does not fit preset 'catseg_tiny' as configured.*the file was saved with "
                                         r"config overrides \{'class_aggregation': False, 'decoder_guidance_dims': "
                                         r"\[4, 4\], 'num_layers': 1\} \(this model: none\): "
                                         r"create_model\('catseg_tiny', pretrained=path\) builds the model it holds"):
        catseg.load_weights(catseg.create_model("catseg_tiny"), weights)  # the preset's own architecture
    out = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(last), "--benchmarks", "synthetic", "--shards", str(synthetic.parent),
                      "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "report.json").read_text())["images"] == 8


def test_accumulated_micro_batches_train_as_the_whole_batch(tmp_path, synthetic):
    """train.grad_accum=2 (two micro-batches of 2) takes the steps a batch of 4 takes: with the same images (no
    random augmentation) and batch-independent normalisation (frozen BatchNorm), the same gradient norm and loss at
    every step (the launch configs' 4 processes of one image each, on fewer GPUs). Single weights are not compared:
    Adam turns rounding-level differences of near-zero gradients into steps of the learning rate's size."""
    from test_training_fixtures import metrics

    runs = {}
    for accum in (1, 2):
        run_dir = tmp_path / f"accum{accum}"
        assert _train_in_process(run_dir, synthetic, "train.steps=3", "train.batch_size=4",
                                 f"train.grad_accum={accum}", "train.log_every=1", "train.deterministic=true",
                                 "data.jitter=false", "data.hflip=false", "data.scale_range=[1, 1]",
                                 "data.shuffle_buffer=1", "model.overrides.backbone_frozen_bn=true") == 0
        runs[accum] = metrics(run_dir)
    assert [m["step"] for m in runs[1]] == [m["step"] for m in runs[2]] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in runs[2]] == pytest.approx([m[key] for m in runs[1]], rel=1e-4), key
    assert runs[1][2]["loss"] < 0.9 * runs[1][0]["loss"]  # the steps did train


@pytest.mark.parametrize("finetune", ["frozen", "qv"])
def test_clip_finetune_of_the_run_config_chooses_what_trains(tmp_path, synthetic, finetune):
    """model.clip_finetune reaches the model: frozen, no CLIP weight moves between two steps while the head's do;
    qv (the quickstart's), only the query and value projections of both towers move."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    assert _train_in_process(run_dir, synthetic, "train.steps=2", "train.ckpt_every=1", "train.keep_last=2",
                             f"model.clip_finetune={finetune}") == 0
    first, second = (load_file(p / "model.safetensors") for p in ckpt.list_checkpoints(run_dir))
    moved = {k for k in first if not torch.equal(first[k], second[k])}
    clip = {k for k in moved if k.startswith("clip.")}
    assert any(k.startswith("layers.") for k in moved) and any(k.startswith("decoder") for k in moved)
    if finetune == "frozen":
        assert not clip
    else:
        assert clip and all(k.endswith(("attn.q_proj_weight", "attn.v_proj_weight")) for k in clip), sorted(clip)
        assert {k.split(".resblocks.")[0] for k in clip} == {"clip.model.transformer", "clip.model.visual.transformer"}


def test_missing_default_shards_say_which_command_makes_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data folder data/shards/coco_stuff/train does not exist here
    assert train_main([]) == 2
    err = capsys.readouterr().err
    assert "python -m data_prep.convert coco_stuff --root <raw coco_stuff folder> --out data/shards" in err


# -- tracking ----------------------------------------------------------------------------------------------------


def test_a_moved_run_folder_keeps_its_artifacts_beside_its_store(tmp_path):
    """The run folder's own store records its artifact folder as an absolute URI: after the folder moved, a logger
    opening it points the store at the new place, so the run's old and new artifacts are listed together and nothing
    is written to the old place."""
    from mlflow.tracking import MlflowClient

    from training.tracking import MLflowLogger, local_store_uri, relocate_local_artifacts

    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    logger = MLflowLogger(local_store_uri(first), first, "catseg", "run")
    logger.log_artifact(tmp_path / "a.txt")
    logger.close()
    assert (first / "mlartifacts").is_dir() and relocate_local_artifacts(first) == 0  # in place: nothing to change
    first.rename(moved)
    logger = MLflowLogger(local_store_uri(moved), moved, "catseg", "run", logger.run_id)
    logger.log_artifact(tmp_path / "b.txt", "later")
    logger.close()
    client = MlflowClient(local_store_uri(moved))
    assert client.get_run(logger.run_id).info.artifact_uri.startswith((moved / "mlartifacts").resolve().as_uri())
    assert {a.path for a in client.list_artifacts(logger.run_id)} == {"a.txt", "later"}
    assert (moved / "mlartifacts" / logger.run_id / "artifacts" / "later" / "b.txt").read_text() == "b"
    assert not first.exists()


def test_unreachable_tracking_server_warns_and_keeps_metrics_locally(tmp_path):
    from training.tracking import LocalLogger, MLflowLogger, MultiLogger

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.warns(UserWarning, match="MLflow tracking at http://127.0.0.1"):
        remote = MLflowLogger(uri, tmp_path, "catseg", "run", timeout_s=2)
    logger = MultiLogger(LocalLogger(tmp_path), remote)
    logger.log_params({"a": 1})
    for step in (1, 2):
        logger.log_metrics({"loss": 1.0 / step}, step)
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == [(1, 1.0), (2, 0.5)]
    assert logger.run_id is None


# -- distributed environment and SLURM --------------------------------------------------------------------------


def test_world_info_from_env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert world_info_from_env() == (0, 0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert world_info_from_env() == (5, 1, 8)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_info_from_env() == (3, 3, 4)  # the launcher's variables win


def test_slurm_hostlists_and_node_commands():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    env = {"SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "node[10-12]",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "4242"}
    node = node_launch_from_env(env)
    assert (node.num_machines, node.machine_rank, node.main_ip, node.procs_per_node) == (3, 2, "node10", 4)
    cmd = accelerate_command(node, "launch/zero3.yaml", ["--config", "c.yaml"], python="py")
    text = " ".join(cmd)
    assert text.startswith("py -m accelerate.commands.launch --config_file launch/zero3.yaml")
    for flag in ("--num_machines 3", "--machine_rank 2", "--main_process_ip node10", "--main_process_port 24242",
                 "--num_processes 12", "training/train.py --config c.yaml"):
        assert flag in text
    with pytest.raises(Exception, match="SLURM_NODEID"):
        node_launch_from_env({"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "a,b"})


def _fake_slurm_bin(folder: Path, nodes: int) -> Path:
    """srun that runs its command once per node (SLURM_NODEID set), scontrol that records its arguments."""
    folder.mkdir()
    srun = folder / "srun"
    srun.write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                    f"for n in $(seq 0 {nodes - 1}); do SLURM_NODEID=$n \"$@\" || exit $?; done\n")
    scontrol = folder / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {folder / 'scontrol.log'}\n")
    for tool in (srun, scontrol):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.mark.parametrize("script, config", [("vith14", "catseg_vith14_swinb"), ("vitg14", "catseg_vitg14_swinb")])
def test_sbatch_scripts_start_one_accelerate_launch_per_node_and_requeue(tmp_path, script, config):
    path = REPO / "launch" / "slurm" / f"{script}.sbatch"
    header = path.read_text()
    assert "#SBATCH --signal=USR1@" in header and "#SBATCH --requeue" in header
    assert "#SBATCH --ntasks-per-node=1" in header
    fake = _fake_slurm_bin(tmp_path / "bin", nodes=2)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHON=PYTHON, CATSEG_SLURM_DRY_RUN="1",
               SLURM_JOB_ID="777", SLURM_JOB_NAME=f"catseg-{script}", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_GPUS_ON_NODE="2")
    out = subprocess.run(["bash", str(path), "--set", "data.root=/data/x"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for rank in (0, 1):
        line = next(x for x in lines if x.startswith(f"node {rank}: "))
        for flag in ("--config_file launch/zero3.yaml", "--num_machines 2", f"--machine_rank {rank}",
                     "--main_process_ip gpu07", "--main_process_port 20777", "--num_processes 4",
                     f"training/train.py --config configs/{config}.yaml --run-dir runs/catseg-{script}-777 "
                     "--resume auto --set data.root=/data/x"):
            assert flag in line, (flag, line)
    assert f"run runs/catseg-{script}-777 not finished: scontrol requeue 777" in out.stdout
    for name in ("launch/zero3.yaml", f"configs/{config}.yaml"):
        assert (REPO / name).is_file()


def test_config_changes_name_each_changed_key(tmp_path):
    from training.config import ABSENT, config_changes, describe_changes, replace_config, trains_differently

    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    path = tmp_path / "config.yaml"
    assert config_changes(path, cfg) is None
    assert replace_config(cfg, path, 0) == (None, {})  # a first config: nothing kept
    assert replace_config(cfg, path, 5) == (None, {}) and config_changes(path, cfg) == {}  # the same: nothing kept
    saved = path.read_text()
    other = load_config(REPO / "configs" / "quickstart.yaml", ["train.steps=70", "optim.lr=0.5"])
    kept, changes = replace_config(other, path, 5)
    assert changes == {"train.steps": (cfg.train.steps, 70), "optim.lr": (cfg.optim.lr, 0.5)}
    # a moved run folder (its config names the old place) or another tracking store train the same; a new MLflow
    # run is for a continuation that trains differently
    assert trains_differently(changes) and trains_differently({"train.steps": (1, 2)})
    assert not trains_differently({"train.run_dir": ("a", "b"), "tracking.uri": ("", "x"), "train.log_every": (1, 2)})
    assert kept == tmp_path / "config.until_step_00000005.yaml" and kept.read_text() == saved
    assert load_config(path).train.steps == 70
    # a key of another version, and the same step again: a second name
    path.write_text(saved.replace("train:\n", "train:\n  retired_option: true\n", 1))
    kept, changes = replace_config(other, path, 5)
    assert kept.name == "config.until_step_00000005.2.yaml" and changes["train.retired_option"] == (True, ABSENT)
    assert describe_changes(changes, most=1) == "optim.lr: 0.001 -> 0.5, and 2 more"
    assert describe_changes(changes).endswith("train.retired_option: True -> (absent)")
    path.write_text("- not a mapping\n")
    kept, changes = replace_config(cfg, path, 9)
    assert changes == {"config.yaml": ("unreadable", "rewritten")} and kept.read_text() == "- not a mapping\n"


def test_a_run_continued_with_another_config_keeps_the_earlier_one(tmp_path, synthetic):
    """Continuing a run with other settings keeps the config it ran with until then beside the new config.yaml, says
    what changed, and attaches the new config to the run's MLflow run, whose params stay those it started with; the
    same settings again keep nothing."""
    import yaml
    from mlflow.tracking import MlflowClient

    from test_training_fixtures import base_env

    run_dir = tmp_path / "run"

    def train(*extra):
        out = subprocess.run([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir",
                              str(run_dir), "--set", f"data.root={synthetic / 'train'}", "train.ckpt_every=2",
                              "schedule.warmup_steps=0", "data.workers=0", *extra],
                             cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    first = train("train.steps=2")
    saved = (run_dir / "config.yaml").read_text()
    assert "with another config" not in first and [p.name for p in run_dir.glob("config*.yaml")] == ["config.yaml"]
    second = train("train.steps=4", "optim.lr=0.0005")
    assert "catseg train: continuing at step 2 with another config than" in second
    assert "'s (optim.lr: 0.001 -> 0.0005, train.steps: 2 -> 4); the earlier one is kept as " \
           "config.until_step_00000002.yaml" in second
    assert (run_dir / "config.until_step_00000002.yaml").read_text() == saved
    now = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (now["train"]["steps"], now["optim"]["lr"]) == (4, 0.0005)
    run_id = ckpt.read_meta(ckpt.list_checkpoints(run_dir)[-1])["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    assert client.get_run(run_id).data.params["train.steps"] == "2"
    assert [a.path for a in client.list_artifacts(run_id, "config_from_step_00000002")] == \
        ["config_from_step_00000002/config.yaml"]
    third = train("train.steps=6", "optim.lr=0.0005")
    assert "continuing at step 4 with another config than" in third and "(train.steps: 4 -> 6)" in third
    train("train.steps=6", "optim.lr=0.0005")  # finished, the same settings: nothing more kept
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == \
        ["config.until_step_00000002.yaml", "config.until_step_00000004.yaml", "config.yaml"]


def test_a_moved_run_folder_continues_its_mlflow_run(tmp_path, synthetic):
    """A run folder moved between two parts of a run continues the same MLflow run in the store it carries, and the
    artifacts logged after the move land in the moved folder."""
    from mlflow.tracking import MlflowClient

    from test_training_fixtures import base_env

    def train(run_dir, steps):
        out = subprocess.run([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir",
                              str(run_dir), "--set", f"data.root={synthetic / 'train'}", f"train.steps={steps}",
                              "train.ckpt_every=2", "train.log_every=1", "schedule.warmup_steps=0", "data.workers=0"],
                             cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    first, moved = tmp_path / "first", tmp_path / "moved"
    train(first, 2)
    run_id = ckpt.read_meta(ckpt.list_checkpoints(first)[-1])["mlflow_run_id"]
    first.rename(moved)
    train(moved, 4)
    meta = ckpt.read_meta(ckpt.list_checkpoints(moved)[-1])
    assert meta["mlflow_run_id"] == run_id
    assert meta["mlflow_tracking_uri"] == f"sqlite:///{(moved / 'mlflow.db').resolve()}"
    client = MlflowClient(meta["mlflow_tracking_uri"])
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert "model.safetensors" in {a.path for a in client.list_artifacts(run_id)}  # the final weights, after the move
    assert (moved / "mlartifacts" / run_id / "artifacts" / "model.safetensors").is_file() and not first.exists()


def test_repeated_set_options_all_apply():
    from training.train import parse_args

    args = parse_args(["--set", "train.steps=5", "data.workers=0", "--set", "train.batch_size=8"])
    assert args.set == ["train.steps=5", "data.workers=0", "train.batch_size=8"]


def test_a_crash_with_loader_workers_ends_the_process(tmp_path, synthetic):
    """An error in the loop (here the checkpoint cannot be written: a file-size limit below its size) ends the
    process with the error, also with loader workers, which ignore SIGTERM; before, it waited for them for ever."""
    import resource

    from test_training_fixtures import base_env

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))

    started = time.monotonic()
    out = subprocess.run([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir",
                          str(tmp_path / "run"), "--set", f"data.root={synthetic / 'train'}", "train.steps=4",
                          "train.ckpt_every=2", "data.workers=1", "train.log_every=2", "schedule.warmup_steps=0"],
                         cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=240, preexec_fn=small_files)
    assert out.returncode != 0 and "Error" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - started < 200
    from mlflow import MlflowClient  # the MLflow run ends FAILED, not RUNNING for ever

    runs = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}").search_runs(["1"])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_slurm_run_refuses_a_second_run_dir(monkeypatch, capsys):
    """The batch scripts pass --run-dir from RUN_DIR and requeue unless that folder finished: a second --run-dir
    after the script name would train elsewhere and requeue the job for ever, so it is refused."""
    from training.slurm_cmd import main as slurm_main

    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1")
    args = ["run", "--launch-config", "launch/cpu.yaml", "--dry-run", "--", "--config", "c.yaml", "--run-dir",
            "runs/job-1", "--resume", "auto"]
    monkeypatch.chdir(REPO)
    assert slurm_main(args) == 0 and "--run-dir runs/job-1" in capsys.readouterr().out
    assert slurm_main(args + ["--run-dir=/scratch/mine"]) == 2
    err = capsys.readouterr().err
    assert "--run-dir is given twice" in err and "set RUN_DIR=DIR before sbatch" in err


def test_a_tracking_store_down_at_the_start_gets_the_whole_run_later(tmp_path, monkeypatch):
    """A store that cannot be reached when training starts (here a SQLite store whose folder is a file until later)
    gets the run's params, the config artifact and the metrics queued meanwhile once it answers, at the latest when
    the run closes; before, the run never opened if the store was down until the end, and artifacts were dropped."""
    import warnings

    from mlflow import MlflowClient

    from training import tracking

    monkeypatch.setattr(tracking, "RETRY_AFTER_S", 0.0)
    folder = tmp_path / "store"
    folder.write_text("not a folder yet")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = tracking.MLflowLogger(uri, run_dir, "catseg", "run")
        assert logger.run_id is None
        config = run_dir / "config.yaml"
        config.write_text("train:\n  steps: 2\n")
        logger.log_params({"train.steps": 2})
        logger.log_artifact(config)
        logger.log_metrics({"loss": 0.5}, 1)
        folder.unlink()
        folder.mkdir()
        logger.close()
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.steps": "2"}
    assert run.data.metrics == {"loss": 0.5}
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["config.yaml"]


def test_stop_request_turns_signals_into_a_checkpointed_stop_or_an_immediate_one(capfd):
    """While the loop runs, SIGTERM, SIGUSR1 and a first Ctrl-C ask for a checkpoint and a stop (the first signal is
    the one reported); a SIGINT within a second of that Ctrl-C is the same press, a later one or a SIGTERM after it
    (how `accelerate launch` passes on a second Ctrl-C) stops at once. Outside the loop Ctrl-C stops at once."""
    import signal

    from training.train import StopRequest

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    now = [100.0]
    try:
        def request() -> StopRequest:
            stop = StopRequest()
            stop.clock = lambda: now[0]
            stop.armed = True
            return stop

        stop = request()
        stop.armed = False
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
        stop.armed = True
        stop._handle(signal.SIGINT, None)
        assert stop.signal == signal.SIGINT and "the run writes a checkpoint and stops" in capfd.readouterr().err
        now[0] += 0.5
        stop._handle(signal.SIGINT, None)  # passed on by a launcher: the same press
        stop._handle(signal.SIGUSR1, None)
        assert stop.signal == signal.SIGINT and capfd.readouterr().err == ""
        now[0] += 1.0
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)

        stop = request()
        stop._handle(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)

        stop = request()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):  # a scheduler's warnings: a stop, never abrupt
            stop._handle(sig, None)
        assert stop.signal == signal.SIGUSR1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_ctrl_c_in_a_terminal_checkpoints_and_stops(tmp_path, synthetic):
    """Ctrl-C in a terminal (SIGINT to the whole process group, loader workers included) makes a one-process run write
    a checkpoint and stop, its MLflow run KILLED. Before, it killed the run without a checkpoint and left the MLflow
    run RUNNING. (Through `accelerate launch`: tests/test_training_launch.py.)"""
    import signal

    from mlflow import MlflowClient

    from test_training_fixtures import base_env, finish, metrics, start, wait_for

    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir", str(run_dir),
                  "--set", f"data.root={synthetic / 'train'}", "train.steps=10000", "train.log_every=1",
                  "train.ckpt_every=10000", "data.workers=1", "schedule.warmup_steps=0"], log, env=base_env())
    wait_for(lambda: len(metrics(run_dir)) >= 1, 180, "a logged step", proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    out = finish(proc, log, timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "Ctrl-C: the run writes a checkpoint and stops" in out and "stopped by signal 2 at step" in out
    saved = ckpt.list_checkpoints(run_dir)
    assert len(saved) == 1 and ckpt.read_meta(saved[0])["step"] >= 1
    assert [r.info.status for r in MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").search_runs(["1"])] == ["KILLED"]


def test_a_run_continued_after_a_crash_logs_each_step_once(tmp_path, synthetic):
    """A run killed after logging step 8 with its newest checkpoint at step 4 (made here by removing the last
    checkpoint of a finished run) trains steps 5 to 8 again: metrics.jsonl and the MLflow run hold every step once,
    with the values the continued run logged (equal, since it resumes exactly); the replaced records, and one cut
    short by the kill, are kept aside in metrics.replaced.jsonl. Taken back to step 4 with another learning rate, the
    run logs steps 5 to 8 into a new MLflow run tagged with the one it continues, whose points stay those of the
    first training. Before, the repeated steps were logged twice in both. The continued run reads its shards from
    another folder (a copy): the same shards moved elsewhere, which does not start a new MLflow run."""
    import shutil

    from mlflow import MlflowClient

    from test_training_fixtures import base_env, metrics

    run_dir = tmp_path / "run"
    step4 = run_dir / "checkpoints" / "step_00000004"

    def train(*extra: str, root=synthetic / "train") -> str:
        out = subprocess.run([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir",
                              str(run_dir), "--set", f"data.root={root}", "train.steps=8",
                              "train.ckpt_every=4", "train.log_every=1", "schedule.warmup_steps=0", "data.workers=0",
                              "train.deterministic=true", *extra],
                             cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    def losses(run_id: str) -> dict[int, float]:
        history = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_metric_history(run_id, "loss")
        assert len({m.step for m in history}) == len(history), "a step logged twice"
        return {m.step: m.value for m in history}

    train()
    first = {m["step"]: m["loss"] for m in metrics(run_dir)}
    first_lr = {m["step"]: m["lr/head"] for m in metrics(run_dir)}
    first_run = ckpt.read_meta(step4)["mlflow_run_id"]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    (run_dir / ckpt.FINAL_FILE).unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "time": 17')
    shutil.copytree(synthetic / "train", tmp_path / "moved")
    err = train(root=tmp_path / "moved")
    assert "moved 5 record(s) past step 4 to metrics.replaced.jsonl" in err and "holds steps up to 8" in err
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 9))
    assert [m["loss"] for m in metrics(run_dir)] == [first[s] for s in range(1, 9)]
    assert len((run_dir / "metrics.replaced.jsonl").read_text().splitlines()) == 5
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_dir))["mlflow_run_id"] == first_run
    assert losses(first_run) == pytest.approx(first)

    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    err = train("optim.lr=0.01", "--resume", str(step4))
    assert "it logs to a new MLflow run, 'run-from-step-4'" in err
    records = {m["step"]: m for m in metrics(run_dir)}
    branch = {step: m["loss"] for step, m in records.items()}
    assert sorted(branch) == list(range(1, 9)) and branch[8] != first[8]
    # the new rate applies, at the schedule's position (before, the optimizer state brought back the old rate)
    assert records[5]["lr/head"] == pytest.approx(10 * first_lr[5])
    second_run = ckpt.read_meta(ckpt.latest_checkpoint(run_dir))["mlflow_run_id"]
    assert second_run != first_run
    assert losses(first_run) == pytest.approx(first)  # the first training's points, untouched
    assert losses(second_run) == pytest.approx({s: branch[s] for s in range(5, 9)})
    run = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_run(second_run)
    assert run.data.tags["catseg.continues_run"] == first_run and run.data.tags["catseg.continues_from_step"] == "4"
    assert run.data.params["optim.lr"] == "0.01" and run.info.status == "FINISHED"


def test_checkpoints_written_while_the_store_was_down_name_the_run_once_it_opens(tmp_path, synthetic):
    """A tracking store down when training starts (a SQLite store whose folder is a file until the first checkpoint
    is written) opens its run later, at the latest when the run closes; the checkpoints written before then name that
    run afterwards (the evaluation service logs a checkpoint's scores into the run it names). Before, they named
    none, and a run continued from them started a new MLflow run."""
    from mlflow import MlflowClient

    from test_training_fixtures import base_env, finish, start, wait_for

    folder, run_dir, log = tmp_path / "store", tmp_path / "run", tmp_path / "log.txt"
    folder.write_text("not a folder yet")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = start([PYTHON, "training/train.py", "--config", "configs/quickstart.yaml", "--run-dir", str(run_dir),
                  "--set", f"data.root={synthetic / 'train'}", "train.steps=40", "train.ckpt_every=2",
                  "train.keep_last=100", "train.log_every=1", "schedule.warmup_steps=0", "data.workers=0",
                  f"tracking.uri={uri}"], log, env=base_env())
    wait_for(lambda: ckpt.latest_checkpoint(run_dir) is not None, 180, "the first checkpoint", proc, log)
    folder.unlink()
    folder.mkdir()
    out = finish(proc, log)
    assert proc.returncode == 0 and "finished step 40/40" in out, out[-3000:]
    metas = [ckpt.read_meta(p) for p in ckpt.list_checkpoints(run_dir)]
    assert len(metas) == 20
    run_ids = {m["mlflow_run_id"] for m in metas}
    assert len(run_ids) == 1 and None not in run_ids and {m["mlflow_tracking_uri"] for m in metas} == {uri}
    history = MlflowClient(uri).get_metric_history(run_ids.pop(), "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))


@pytest.mark.parametrize("fields, launch, configured, expected", [
    ("zero_stage,mixed_precision", "bf16", "", "bf16"),  # mixed_precision in the launch YAML
    ("zero_stage,mixed_precision", "no", "", "no"),  # the YAML's "no" is a choice too
    ("", "bf16", "", "bf16"),  # --mixed_precision bf16 on the command line
    ("", "no", "", None),  # nothing asked: the DeepSpeed config's torch_autocast decides
    ("zero_stage,mixed_precision", "bf16", "no", "no"),  # the run config wins
    ("", "no", "bf16", "bf16"),
])
def test_deepspeed_precision_is_taken_out_of_accelerates_way(monkeypatch, fields, launch, configured, expected):
    """Under DeepSpeed the precision the launch or the run config asks for becomes torch autocast; accelerate is
    left with "no" and without the YAML's mixed_precision, which it refuses beside a DeepSpeed config file (and its
    bf16 would store the weights in bf16)."""
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", fields)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f'train.mixed_precision="{configured}"'])
    assert deepspeed_precision(cfg) == expected
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    assert os.environ["ACCELERATE_CONFIG_DS_FIELDS"] == ("zero_stage" if fields else "")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16 under DeepSpeed is not supported"):
        deepspeed_precision(load_config(REPO / "configs" / "quickstart.yaml", ["train.mixed_precision="]))
