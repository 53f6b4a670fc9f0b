"""Benchmark registry and the PAS-20b scoring rule."""

import numpy as np
import pytest
import torch

from evaluation.benchmarks import BENCHMARKS, PAPER_BENCHMARKS, get_benchmark, parse_benchmarks
from evaluation.metrics import confusion_matrix, summarize


def test_voc20b_prompts_59_names_and_scores_21():
    b = get_benchmark("voc20b")
    prompts = b.prompt_names()
    assert len(prompts) == 59
    scored = b.class_names()
    assert len(scored) == 21
    assert scored[:20] == get_benchmark("voc20").class_names() == prompts[:20]
    assert scored[20] == "background"


def test_voc20b_maps_every_prediction_from_20_up_to_background():
    b = get_benchmark("voc20b")
    labels = np.array([0, 19, 20, 21, 40, 58])
    np.testing.assert_array_equal(b.map_prediction(labels), [0, 19, 20, 20, 20, 20])
    t = torch.tensor([[3, 25], [20, 58]])
    assert b.map_prediction(t).tolist() == [[3, 20], [20, 20]]
    # Other benchmarks score what they prompt.
    same = np.array([0, 100, 149])
    assert get_benchmark("ade150").map_prediction(same) is same


def test_voc20b_background_counts_in_the_mean():
    b = get_benchmark("voc20b")
    gt = np.array([0, 0, 20, 20, 20, 255])
    # Prompt ids 25 and 58 are PASCAL-Context "background" classes: they count as correct background.
    pred_prompt = np.array([0, 25, 25, 58, 20, 3])
    pred = b.map_prediction(pred_prompt)
    conf = confusion_matrix(pred, gt, len(b.class_names()), b.ignore_index)
    s = summarize(conf)
    # class 0: tp 1, union 2; background: tp 3, union 4. Both in the mean.
    assert s["num_counted"] == 2
    assert s["miou"] == pytest.approx((0.5 + 0.75) / 2)
    assert s["per_class_iou"][20] == pytest.approx(0.75)


def test_class_lists_have_the_benchmark_sizes():
    sizes = {"ade847": 847, "pc459": 459, "ade150": 150, "pc59": 59, "voc20": 20, "voc20b": 21, "coco": 171}
    for name, n in sizes.items():
        assert len(get_benchmark(name).class_names()) == n, name
    # Ignore values must lie outside the class ids, or ignored pixels would be scored.
    for name in sizes:
        b = get_benchmark(name)
        assert b.ignore_index >= len(b.class_names())


def test_default_shard_location(tmp_path):
    assert get_benchmark("ade150").shard_dir(tmp_path) == tmp_path / "ade150" / "val"
    assert str(get_benchmark("voc20b").shard_dir("/s")) == "/s/voc20b/val"
    # data_prep names the COCO-Stuff folder after the dataset, not the class list.
    assert str(get_benchmark("coco").shard_dir("/s")) == "/s/coco_stuff/val"


def test_unknown_benchmark_names_the_choices():
    with pytest.raises(ValueError, match="unknown benchmark 'ade-847'; choose one of: ade847, pc459, ade150"):
        get_benchmark("ade-847")
    with pytest.raises(ValueError, match="no benchmark named"):
        parse_benchmarks(" , ")


def test_parse_benchmarks_keeps_order_and_expands_paper():
    assert [b.name for b in parse_benchmarks("pc59, ade150,pc59")] == ["pc59", "ade150"]
    assert tuple(b.name for b in parse_benchmarks("paper")) == PAPER_BENCHMARKS
    assert set(PAPER_BENCHMARKS) | {"coco", "synthetic"} == set(BENCHMARKS)


def test_registry_matches_the_shards_data_prep_writes():
    from data_prep import sources

    writers = {
        "coco": sources.CocoStuff,
        "ade150": sources.Ade150,
        "ade847": sources.Ade847,
        "pc59": sources.PascalContext59,
        "pc459": sources.PascalContext459,
        "voc20": sources.Voc20,
        "voc20b": sources.Voc20Background,
    }
    for name, source in writers.items():
        b = get_benchmark(name)
        assert (b.dataset, b.ignore_index, b.vocab) == (source.name, source.ignore_index, source.class_list), name
