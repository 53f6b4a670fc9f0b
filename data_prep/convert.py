"""Convert a raw dataset tree into WebDataset shards: ``python -m data_prep.convert DATASET --root RAW --out SHARDS``.

DATASET is one of coco_stuff, ade150, ade847, pc59, pc459, voc20, voc20b, hf. Shards go to SHARDS/<dataset>/<split>/.
The run resumes from complete shards, so rerunning after a kill (or a fix of bad files) finishes the rest.

Examples:
  python -m data_prep.convert coco_stuff --root datasets/coco --out shards --workers 8
  python -m data_prep.convert ade847 --root datasets/ade --out shards --num-parts 4 --part 2
  python -m data_prep.convert hf --root scene_parse_150 --hf-config scene_parsing --image-column image \\
      --label-column annotation --class-names ade150 --reduce-zero-label --split validation --out shards
  python -m data_prep.convert coco_stuff --out shards --verify      # recheck written shards only

Exit status: 0 done; 1 bad samples (listed in report.json; rerun with --skip-bad to leave them out) or failed
verification; 2 a problem that stopped the run (missing raw tree, unwritable output, full disk).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep import shards
from data_prep.pipeline import ConversionError, ConvertOptions, Source, convert_split
from data_prep.sources import SOURCES, get_source

DATASETS = (*SOURCES, "hf")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.convert",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=DATASETS, help="which dataset to convert")
    parser.add_argument("--root", help="folder the raw dataset was unpacked into (for hf: a Hub name or local path)")
    parser.add_argument("--out", required=True, help="shard root; a split goes to OUT/<dataset>/<split>/")
    parser.add_argument("--split", action="append", help="split to convert (repeatable; default: the dataset's usual ones)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes (0: none)")
    parser.add_argument("--num-parts", type=int, default=1, help="split the shards into N disjoint parts (machines)")
    parser.add_argument("--part", type=int, default=0, help="which part this machine converts (0..N-1)")
    parser.add_argument("--skip-bad", action="store_true", help="leave bad samples out (listed in report.json)")
    parser.add_argument("--verify", action="store_true", help="recheck every shard against its record (alone without --root)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--id-list", help="pc59/pc459: file of image ids to convert instead of the published split")
    hf = parser.add_argument_group("hf (Hugging Face datasets)")
    hf.add_argument("--hf-config", help="load_dataset configuration name")
    hf.add_argument("--name", default="hf", help="dataset name for keys and the output folder (default hf)")
    hf.add_argument("--image-column", default="image")
    hf.add_argument("--label-column", default="label")
    hf.add_argument("--class-names", help="JSON list file, text file (one a line) or a catseg vocabulary name")
    hf.add_argument("--ignore-value", type=int, default=255, help="raw label value for unlabelled pixels (default 255)")
    hf.add_argument("--reduce-zero-label", action="store_true", help="raw 0 = unlabelled and raw k = class k-1")
    return parser


def make_source(args: argparse.Namespace) -> Source:
    """Build the source named on the command line."""
    if args.dataset != "hf":
        return get_source(args.dataset, args.root, id_list=args.id_list)
    from data_prep.hf import HuggingFaceConfig, HuggingFaceSource, read_class_names

    if not args.class_names:
        raise ValueError("hf needs --class-names (a JSON list file, a text file or a catseg vocabulary name)")
    config = HuggingFaceConfig(
        path=args.root,
        class_names=read_class_names(args.class_names),
        name=args.name,
        config=args.hf_config,
        image_column=args.image_column,
        label_column=args.label_column,
        class_list=args.class_names if not Path(args.class_names).is_file() else Path(args.class_names).stem,
        ignore_value=args.ignore_value,
        reduce_zero_label=args.reduce_zero_label,
        splits=tuple(args.split or ("train",)),
    )
    return HuggingFaceSource(config)


def verify(out: Path, name: str, splits: list[str]) -> int:
    """Verify the shard folders of ``splits``; print the outcome and return the number of failing folders."""
    failures = 0
    for split in splits:
        folder = out / name / split
        try:
            problems = shards.verify_folder(folder)
        except (OSError, ValueError) as error:
            problems = [str(error)]
        if problems:
            failures += 1
            print(f"verify {folder}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  {problem}")
        else:
            info = shards.read_dataset_info(folder)
            print(f"verify {folder}: ok ({info['num_shards']} shards, {info['num_samples']} samples)")
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    name = args.name if args.dataset == "hf" else args.dataset
    if args.root is None:
        if not args.verify:
            parser.error("--root is required to convert (or give --verify alone to recheck written shards)")
        if args.split:
            splits = args.split
        else:
            splits = sorted(p.name for p in (out / name).iterdir() if p.is_dir()) if (out / name).is_dir() else []
            if not splits:
                print(f"error: no shard folders under {out / name}; convert first", file=sys.stderr)
                return 2
        return 1 if verify(out, name, splits) else 0

    try:
        source = make_source(args)
        splits = args.split or list(source.default_splits)
        for split in splits:
            source.check_split(split)
        options = ConvertOptions(
            out=out,
            shard_size=args.shard_size,
            workers=args.workers,
            num_parts=args.num_parts,
            part=args.part,
            skip_bad=args.skip_bad,
            progress=not args.no_progress,
        )
    except ValueError as error:
        parser.error(str(error))

    status = 0
    try:
        for split in splits:
            summary = convert_split(source, split, options)
            print(summary.describe(), flush=True)
            if summary.bad and not options.skip_bad:
                print(f"error: {len(summary.bad)} bad samples in {split}; fix them and rerun, or rerun with --skip-bad")
                status = 1
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error.filename or ''} {error.strerror or error}".strip(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (complete shards are kept)", file=sys.stderr)
        return 130
    if args.verify and verify(out, name, splits):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
