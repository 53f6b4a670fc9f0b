"""The training package's parts one by one, in process: the learning-rate schedule and optimizer groups, the loss's
upsampling, the augmentation against PIL, the sample streams (corrupt samples, ranks, layouts, resume), checkpoint
folders and meta, and run-config parsing (helpers from test_training_units)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_training_fixtures import REPO, write_synthetic
from test_training_units import _fake_checkpoint, _sample, _shard_folder
from training import checkpoint as ckpt
from training.config import ConfigError, OptimConfig, ScheduleConfig, load_config, trains_differently
from training.criterion import PixelBCECriterion
from training.data import AugmentConfig, DataError, ShardStream, StreamState, augment, open_shards
from training.optim import LRSchedule, build_optimizer, lr_factor


@pytest.fixture(scope="module")
def synthetic_train(tmp_path_factory):
    return open_shards(write_synthetic(tmp_path_factory.mktemp("shards"), train=48, val=8, shard_size=12) / "train")


# -- schedule and optimizer ----------------------------------------------------------------------------------------


def _two_group_optimizer():
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([
        {"params": [w], "lr": 1.0, "base_lr": 1e-3, "weight_decay": 0.1, "name": "head"},
        {"params": [b], "lr": 1.0, "base_lr": 1e-3, "weight_decay": 0.0, "name": "head.no_decay"}])


def test_lr_schedule_sets_each_steps_rate_and_resumes_from_its_position():
    """LRSchedule gives every group base_lr x lr_factor(step) for the optimizer step it takes next, one step per
    step(); last_lrs reports the rate the step just taken used, per model part (the .no_decay twins left out); a
    schedule restored from its state_dict sets the rates of its position at once (the first resumed step does not
    run at the rate the optimizer state was saved with, e.g. after train.steps changed)."""
    cfg = ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    optimizer = _two_group_optimizer()
    schedule = LRSchedule(optimizer, 20, cfg)
    for step in range(20):
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * lr_factor(step, 20, cfg)] * 2), step
        schedule.step()
        assert schedule.last_lrs() == pytest.approx({"head": 1e-3 * lr_factor(step, 20, cfg)}), step
    restored = _two_group_optimizer()  # its groups hold lr 1.0, as a loaded optimizer state holds the saved rates
    again = LRSchedule(restored, 30, cfg)  # continued with more steps
    again.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert [g["lr"] for g in restored.param_groups] == pytest.approx([1e-3 * lr_factor(20, 30, cfg)] * 2)
    again.step()
    assert again.last_lrs() == pytest.approx({"head": 1e-3 * lr_factor(20, 30, cfg)})


@pytest.mark.parametrize("name", ["cosine", "poly", "constant"])
def test_warmup_ramps_every_schedule_and_never_exceeds_the_peak(name):
    """schedule.warmup_steps ramps the rate linearly up to the peak whatever the decay after it (constant
    included); the peak is reached at the last warm-up step and never exceeded."""
    cfg = ScheduleConfig(name=name, warmup_steps=5)
    factors = [lr_factor(step, 50, cfg) for step in range(50)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert max(factors) == pytest.approx(1.0) and factors[5] == pytest.approx(1.0)


def test_an_optimizer_with_nothing_to_train_is_refused_by_name():
    """Every learning rate 0 (or everything frozen): the optimizer is refused saying so, not with torch's 'empty
    parameter list'."""
    import catseg

    model = catseg.create_model("catseg_tiny")
    with pytest.raises(ValueError, match="no parameter trains: every group is frozen or has learning rate 0"):
        build_optimizer(model, OptimConfig(lr=0.0, clip_lr=0.0, backbone_lr=0.0))


# -- loss ------------------------------------------------------------------------------------------------------------


def test_pixel_bce_upsamples_logits_bilinearly_to_the_labels_in_float32():
    """The logits are upsampled to the label size bilinearly with align_corners=False (the release's F.interpolate),
    not the labels downsampled nor nearest-neighbour; bf16 logits (autocast's) give the same float32 loss as their
    float32 values."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 16, 16))
    labels[0, :5] = 255
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    target = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    valid = (labels != 255)[:, None].float()
    per_pixel = F.binary_cross_entropy_with_logits(up, target, reduction="none") * valid
    expected = (per_pixel.sum((1, 2, 3)) / (valid.sum((1, 2, 3)) * 3)).mean()
    torch.testing.assert_close(PixelBCECriterion(255)(logits, labels), expected)
    half = logits.bfloat16()
    loss = PixelBCECriterion(255)(half, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, PixelBCECriterion(255)(half.float(), labels))


# -- augmentation ----------------------------------------------------------------------------------------------------


def test_augment_is_the_whole_image_resized_then_cropped_and_flipped_together():
    """The crop equals a window of the whole sample resized (image: PIL bilinear; label: PIL nearest, pixel
    centres, as detectron2's ResizeShortestEdge), and a flip turns image and label together; about half the
    samples are flipped."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    label = rng.integers(0, 20, (64, 96), dtype=np.uint8)
    cfg = AugmentConfig(crop_size=32, short_side=32, jitter=False, hflip=True)  # scale 1/2 exactly: no rounding
    whole_image = np.asarray(Image.fromarray(image).resize((48, 32), Image.BILINEAR)).astype(int)
    whole_label = np.asarray(Image.fromarray(label).resize((48, 32), Image.NEAREST))
    flips = []
    for seed in range(16):
        out_image, out_label = augment(image, label.astype(np.int32), cfg, np.random.default_rng(seed))
        found = [(x0, flip) for x0 in range(48 - 32 + 1) for flip in (False, True)
                 if np.array_equal(out_label, whole_label[:, x0:x0 + 32][:, ::-1 if flip else 1])
                 and np.abs(out_image - whole_image[:, x0:x0 + 32][:, ::-1 if flip else 1]).max() <= 1]
        assert len(found) == 1, (seed, found)
        flips.append(found[0][1])
    assert 4 <= sum(flips) <= 12, flips


def test_augment_without_jitter_or_flip_at_the_crop_size_returns_the_sample():
    """data.jitter=false and data.hflip=false with a sample of the crop size: image and label come back unchanged."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 40)).astype(np.int32)
    cfg = AugmentConfig(crop_size=40, short_side=40, jitter=False, hflip=False)
    for seed in range(8):
        out_image, out_label = augment(image, label, cfg, np.random.default_rng(seed))
        assert np.array_equal(out_image, image) and np.array_equal(out_label, label), seed


# -- stream --------------------------------------------------------------------------------------------------------


def test_a_label_value_outside_the_classes_makes_a_corrupt_sample():
    """A label id equal to the class count (one past the last class) is refused like any other out-of-range id; the
    ignore value is not."""
    from data_prep import shards
    from data_prep.shards import CorruptSampleError
    from training.data import decode

    def sample(top: int) -> dict:
        label = np.zeros((8, 8), np.uint8)
        label[0, 0] = top
        return shards.build_sample("toy_0", _png(), "png", label, label_dtype="uint8", ignore_index=255,
                                   class_list="toy", source={})

    assert decode(sample(255), 2, 255)[1][0, 0] == 255
    assert decode(sample(1), 2, 255)[1][0, 0] == 1
    with pytest.raises(CorruptSampleError, match=r"label value 2 outside 0..1 \(ignore 255\)"):
        decode(sample(2), 2, 255)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_only_corrupt_samples_in_a_row_stop_the_stream(tmp_path, monkeypatch):
    """Corrupt samples spread through the data are skipped however many there are; MAX_CORRUPT_IN_A_ROW of them in
    a row stop the stream with a DataError."""
    import training.data

    monkeypatch.setattr(training.data, "MAX_CORRUPT_IN_A_ROW", 3)
    bad = b"not a jpeg at all"
    samples = [_sample(i, bad if i % 2 else None) for i in range(8)]  # good, bad, good, bad, ...
    folder = _shard_folder(tmp_path / "spread", [samples])
    stream = ShardStream(open_shards(folder), AugmentConfig(32, 32, jitter=False, hflip=False), 1, 0, 0, 1, 0,
                         shuffle=1)
    batches = list(itertools.islice(iter(stream), 13))  # past three rounds: 12 corrupt samples, never two in a row
    assert batches[-1]["corrupt"] == 12
    folder = _shard_folder(tmp_path / "run", [[_sample(0, bad), _sample(1, bad), _sample(2, bad), _sample(3)]])
    stream = ShardStream(open_shards(folder), AugmentConfig(32, 32, jitter=False, hflip=False), 1, 0, 0, 1, 0,
                         shuffle=1)
    with pytest.raises(DataError, match="3 corrupt samples in a row"):
        next(iter(stream))


def _plain_stream(shards, hflip=False, **kwargs):
    """Batches of 3 of the synthetic 128 px samples as they are (no resize, crop, jitter; flip if asked)."""
    return ShardStream(shards, AugmentConfig(128, 128, jitter=False, hflip=hflip), 3, 0, shuffle=4, **kwargs)


def test_each_process_and_loader_worker_reads_its_own_samples(synthetic_train):
    """The streams of two processes, and of two loader workers of one process, draw different shards or orders: the
    same training images (not only other augmentations of them) would make the extra processes useless."""
    take = lambda stream: next(iter(stream))["images"]
    rank0 = take(_plain_stream(synthetic_train, rank=0, world_size=2, num_workers=1))
    rank1 = take(_plain_stream(synthetic_train, rank=1, world_size=2, num_workers=1))
    assert not torch.equal(rank0, rank1)
    worker0 = take(_plain_stream(synthetic_train, rank=0, world_size=1, num_workers=2, rotation=0))
    worker1 = take(_plain_stream(synthetic_train, rank=0, world_size=1, num_workers=2, rotation=1))
    assert not torch.equal(worker0, worker1)


def test_each_sample_draws_its_own_augmentation(synthetic_train):
    """Within one round (one shard read) each sample draws its own random augmentation: with data.hflip some of the
    twelve samples are flipped and some not (the same draw for all would flip whole shards at once)."""
    kwargs = dict(rank=0, world_size=1, num_workers=1)
    plain = torch.cat([b["images"] for b in itertools.islice(iter(_plain_stream(synthetic_train, **kwargs)), 4)])
    maybe = torch.cat([b["images"] for b in itertools.islice(iter(_plain_stream(synthetic_train, True, **kwargs)), 4)])
    flipped = [not torch.equal(a, b) for a, b in zip(plain, maybe)]
    for a, b, f in zip(plain, maybe, flipped):
        assert torch.equal(b, a.flip(-1) if f else a)
    assert 0 < sum(flipped) < len(flipped), flipped


def test_streams_restarted_with_another_layout_do_not_replay_what_was_trained(synthetic_train):
    """A checkpoint of one loader worker continued with two: the streams start past every round used so far, so the
    first batches are not the ones the checkpointed run already trained on."""
    aug = AugmentConfig(64, 64, (0.8, 1.2))
    taken = list(itertools.islice(iter(ShardStream(synthetic_train, aug, 3, 0, 0, 1, 1, shuffle=8)), 2))
    state = StreamState(1, 0, 1)
    for batch in taken:
        state.update(batch)
    restored = StreamState(2, 0, 1)
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    stream = ShardStream(synthetic_train, aug, 3, 0, 0, 1, 2, shuffle=8, positions=restored.positions,
                         rotation=restored.rotation)
    again = list(itertools.islice(iter(stream), 2))
    assert all(b["position"][0] >= 1 for b in again)
    assert not any(torch.equal(a["images"], b["images"]) for a in taken for b in again)


def test_the_corrupt_count_carries_over_a_resume():
    """The corrupt samples counted before a checkpoint are part of the count after resuming it, with the same or
    another stream layout."""
    state = StreamState(1, 0, 1)
    state.update({"stream": 0, "position": [0, 3], "corrupt": 2})
    for workers in (1, 2):
        restored = StreamState(workers, 0, 1)
        restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
        assert restored.corrupt == 2
        restored.update({"stream": 0, "position": [1, 3], "corrupt": 1})
        assert restored.corrupt == 3


def test_shuffle_buffer_shuffles_a_shard_smaller_than_itself():
    """Every sample comes out once; a shard shorter than the buffer (data.shuffle_buffer 256 by default) is still
    shuffled, as is the tail of a longer one."""
    from training.data import shuffle_buffer

    rng = np.random.default_rng(0)
    out = list(shuffle_buffer(iter(range(20)), 64, rng))
    assert sorted(out) == list(range(20)) and out != list(range(20))
    out = list(shuffle_buffer(iter(range(100)), 16, rng))
    assert sorted(out) == list(range(100)) and out[-16:] != sorted(out[-16:])


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_cleanup_after_a_kill_keeps_the_newest_checkpoint_and_removes_leftovers(tmp_path):
    """A run killed between a save's last rename and deleting the checkpoint it replaced (step_N and .old-step_N
    both there), or while pruning deleted a folder (.del-step_M): the resume takes the new step_N, and the cleanup
    removes the replaced copy and the half-deleted folder."""
    new = _fake_checkpoint(tmp_path, 200)
    old = tmp_path / "checkpoints" / ".old-step_00000200"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"step": 200, "preset": "catseg_tiny", "created": "replaced"}))
    doomed = tmp_path / "checkpoints" / ".del-step_00000100"
    (doomed / "state").mkdir(parents=True)
    (doomed / "state" / "optimizer.bin").write_bytes(b"x" * 100)
    assert ckpt.resolve_resume(tmp_path, "auto") == new
    ckpt.remove_partial(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000200"]
    assert ckpt.read_meta(new)["created"] == "now"


def test_a_meta_file_without_step_or_preset_is_named(tmp_path):
    path = _fake_checkpoint(tmp_path, 10)
    (path / "meta.json").write_text(json.dumps({"step": 10}))
    with pytest.raises(ckpt.CheckpointError, match=r"meta.json lacks preset"):
        ckpt.read_meta(path)


def test_naming_the_mlflow_run_leaves_checkpoints_that_name_one(tmp_path):
    """record_mlflow_run fills in the run of checkpoints written while the store was down and leaves those that
    already name a run (the evaluation service logs a checkpoint's scores into that run)."""
    named = _fake_checkpoint(tmp_path, 100)
    (named / "meta.json").write_text(json.dumps(dict(ckpt.read_meta(named), mlflow_run_id="first",
                                                     mlflow_tracking_uri="sqlite:///a.db")))
    unnamed = _fake_checkpoint(tmp_path, 200)
    assert ckpt.record_mlflow_run(tmp_path, "second", "sqlite:///b.db") == [unnamed]
    assert (ckpt.read_meta(named)["mlflow_run_id"], ckpt.read_meta(named)["mlflow_tracking_uri"]) == \
        ("first", "sqlite:///a.db")
    assert (ckpt.read_meta(unnamed)["mlflow_run_id"], ckpt.read_meta(unnamed)["mlflow_tracking_uri"]) == \
        ("second", "sqlite:///b.db")


# -- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, needle", [
    (["optim.lr=true"], "optim.lr = True has the wrong type; expected a number"),
    (["train.steps=true"], "train.steps = True has the wrong type; expected an integer"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas = [0.9, 1.0]; each must be in [0, 1)"),
    (["data.scale_range=[0.0, 1.0]"], "data.scale_range = [0.0, 1.0]; need 0 < low <= high"),
])
def test_more_bad_config_values_are_errors_naming_the_key(override, needle):
    """A YAML boolean is not a number (true would be a learning rate of 1 or one step); betas of 1 and a zero
    scale are refused before anything starts."""
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "quickstart.yaml", override)
    assert needle in str(err.value)


def test_set_values_may_hold_an_equals_sign_or_be_empty(tmp_path):
    """--set KEY=VALUE splits at the first '=' (a path may hold more); an empty value is the empty string (the
    default of the string keys)."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["train.run_dir=runs/lr=1e-3", "tracking.uri="])
    assert cfg.train.run_dir == "runs/lr=1e-3" and cfg.tracking.uri == ""


def test_a_config_file_names_its_run_unless_it_says_otherwise(tmp_path):
    """A run config without `name` is named after its file, so its default run folder is runs/<file stem>."""
    path = tmp_path / "my_ablation.yaml"
    path.write_text("model:\n  preset: catseg_tiny\n")
    cfg = load_config(path)
    assert cfg.name == "my_ablation" and cfg.run_dir() == Path("runs/my_ablation")
    assert load_config(path, ["name=other"]).name == "other"


def test_bookkeeping_changes_do_not_train_differently():
    """Continuing a run with only where and how often things are written changed (run name and folder, log and
    checkpoint intervals, checkpoints kept, the weights folder, the tracking settings) continues the same training;
    any other key does not."""
    for key in ("name", "train.run_dir", "train.log_every", "train.ckpt_every", "train.keep_last",
                "model.weights_dir", "tracking.uri", "tracking.experiment"):
        assert not trains_differently({key: ("a", "b")}), key
    for key in ("train.steps", "optim.lr", "data.root", "train.seed", "model.overrides.num_layers"):
        assert trains_differently({key: ("a", "b")}), key


def test_a_new_loader_layout_does_not_replay_another_processs_stream(synthetic_train, tmp_path):
    """Continued with another data.workers count, rank 1 of 2 gets global stream 1, which was rank 0's second
    stream: every stream restarts past the highest round any process had reached (read from all the checkpoint's
    train_rank*.json), so rank 1 does not train again on batches rank 0 already took. Before, it restarted past its
    own streams' rounds only and replayed rank 0's."""
    import itertools

    aug = AugmentConfig(64, 64, (0.8, 1.2))
    # the old run: rank 0's loader worker 1 (global stream 1) got into round 3, a round ahead of rank 1's streams
    old = ShardStream(synthetic_train, aug, 3, 0, rank=0, world_size=2, num_workers=2, shuffle=8, rotation=1)
    old_batches = list(itertools.islice(iter(old), 16))
    assert old_batches[-1]["position"][0] == 3
    states = {0: {"num_workers": 2, "rank": 0, "world_size": 2, "positions": {"0": [3, 0], "1": [3, 3]},
                  "next_stream": 0, "corrupt": 0},
              1: {"num_workers": 2, "rank": 1, "world_size": 2, "positions": {"0": [2, 6], "1": [2, 3]},
                  "next_stream": 0, "corrupt": 0}}
    (tmp_path / ckpt.STATE_DIR).mkdir()
    for rank, data in states.items():
        (tmp_path / ckpt.STATE_DIR / f"train_rank{rank}.json").write_text(json.dumps({"step": 8, "data": data}))
    assert ckpt.last_data_round(tmp_path) == 3
    restored = StreamState(1, 1, 2)
    restored.load_state_dict(dict(states[1], last_round_any_process=ckpt.last_data_round(tmp_path)))
    assert restored.positions == {0: [4, 0]}
    new = ShardStream(synthetic_train, aug, 3, 0, rank=1, world_size=2, num_workers=1, shuffle=8,
                      positions=restored.positions)
    for batch in itertools.islice(iter(new), 8):
        assert not any(torch.equal(batch["images"], o["images"]) for o in old_batches)


def test_a_section_with_every_key_commented_out_is_an_empty_section(tmp_path):
    """A run config whose `tracking:` keeps only commented-out keys (YAML reads it as null) takes the section's
    defaults, and --set can still set a key in it; a file that is not a mapping is refused naming it. Before, the
    section was refused ("'tracking.' must be a mapping of keys, got None"), and a list file gave an
    AttributeError."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\ntracking:\n  # experiment: mine\n")
    cfg = load_config(path)
    assert cfg.train.steps == 7 and cfg.tracking == load_config(None).tracking
    assert load_config(path, ["tracking.experiment=other"]).tracking.experiment == "other"
    path.write_text("- train\n- data\n")
    with pytest.raises(ConfigError, match=f"{path}: a run config is a mapping of sections"):
        load_config(path)
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="'train' must be a mapping of keys, got 5"):
        load_config(path)
