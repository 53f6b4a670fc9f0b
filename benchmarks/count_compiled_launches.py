"""Kernel launches of a whole-model compiled training step, counted on the CPU from the code torch.compile generates,
and the activations its forward keeps for the backward.

    python benchmarks/count_compiled_launches.py --preset catseg_vitb16_r101 --batch 1 --json launches.json

Compiles the model as the trainer's `train.compile: true` does (`model.compile()`), runs one forward + backward of
the bench's training step under bf16 autocast, and counts the calls in the generated forward and backward graphs:
fused kernels (inductor's own) and library kernels (matrix products, convolutions, attention). The same graphs on a
GPU differ in their fused kernels (Triton instead of C++) but not in what is fused or in the library calls, so the
count predicts the launches of a compiled GPU step. Set against them: the operators the same eager forward and
backward launch one by one, counted on fake tensors (`catseg.memcount`, as `python -m catseg.bench --count-memory`).
The loss, its resize and the optimizer step stay eager, as in training.

Memory: the bytes of the tensors the compiled backward takes from the forward (`catseg.memcount.SavedForBackward`),
against what the eager forward leaves alive for its backward, counted on fake tensors (all tensors the forward
made that outlive it, less the logits). Both include the bf16 copies of weights that autocast makes.

Slow on a small CPU: encoding the 171-class vocabulary with 80 templates takes minutes for the presets, and the
compiled step runs for real.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catseg import create_model, inference  # noqa: E402
from catseg.files import write_json_atomic  # noqa: E402
from catseg.memcount import SavedForBackward, counting, mha_unfused  # noqa: E402
from catseg.ops import one_hot_bce_with_logits, resize  # noqa: E402

FUSED = re.compile(r"^\s+(?:\w+\.)?(cpp_fused_\w+|triton_\w+)(?:\.run)?\(", re.M)
LIBRARY = re.compile(r"^\s+(?:\w+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(", re.M)


def count_calls(code: str) -> dict:
    """Fused-kernel and library calls in the `call` function of one piece of generated code."""
    start = code.index("def call(")
    end = code.find("\ndef ", start + 1)
    call = code[start:end if end > 0 else len(code)]
    library = Counter(LIBRARY.findall(call))
    return {"fused_kernels": len(FUSED.findall(call)), "library_calls": sum(library.values()),
            "library": dict(library.most_common())}


def _build(preset: str, stencil: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(preset)
    model.check_inputs = False
    inference.stencil_upsampling(model, stencil)
    model.config.class_chunk_size = None  # training runs all classes at once
    return model


def _step(model, batch: int, classes: int):
    """The bench's training forward + loss + backward (bf16 autocast); returns a function running the forward and one
    running the rest."""
    s = model.image_size
    names = [f"class {i}" for i in range(classes)]
    images = torch.rand(batch, 3, s, s)
    labels = torch.randint(0, classes, (batch, s, s))
    model.text_embeddings(names)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images, names)

    def backward(logits):
        valid = torch.ones_like(labels, dtype=torch.bool)
        one_hot_bce_with_logits(resize(logits.float(), (s, s)), labels, valid).mean().backward()

    return forward, backward


def eager_operators(preset: str, batch: int, classes: int) -> dict:
    """Operators of an eager forward and of the loss + backward, and the bytes the forward leaves for the backward,
    counted on fake tensors (the second step, after the one-off constant tensors of the first)."""
    model = _build(preset)
    with mha_unfused(), counting(model) as counter:
        forward, backward = _step(model, batch, classes)
        for _ in range(2):
            start, live = counter.operators, counter.live
            logits = forward()
            middle, kept = counter.operators, counter.live - live - logits.untyped_storage().nbytes()
            backward(logits)
            model.zero_grad(set_to_none=True)
    return {"forward": middle - start, "backward": counter.operators - middle, "kept_for_backward_bytes": kept}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="catseg_tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=171)
    p.add_argument("--stencil-upsampling", action="store_true", help="as the bench's flag: compiled, the decoder's "
                   "x2 upsampling as a pointwise stencil (UpStage.stencil)")
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args(argv)

    eager = eager_operators(args.preset, args.batch, args.classes)
    print(f"eager operators: forward {eager['forward']}, loss + backward {eager['backward']}")
    model = _build(args.preset, args.stencil_upsampling)
    forward, backward = _step(model, args.batch, args.classes)
    recorder = SavedForBackward()
    model.compile(backend=recorder)

    t = time.perf_counter()
    _, codes = run_and_get_code(lambda: backward(forward()))
    graphs = [count_calls(code) for code in codes]
    result = {"preset": args.preset, "batch": args.batch, "classes": args.classes,
              "stencil_upsampling": args.stencil_upsampling,
              "torch": torch.__version__,
              "compile_and_run_s": round(time.perf_counter() - t, 1), "eager_operators": eager, "graphs": graphs,
              "launches": sum(g["fused_kernels"] + g["library_calls"] for g in graphs),
              "compiled_saved_for_backward_bytes": recorder.bytes,
              "largest_saved": [(n, list(shape), str(dtype), b) for n, shape, dtype, b in
                                sorted((x for g in recorder.saved for x in g), key=lambda x: -x[3])[:20]],
              "command": "python benchmarks/count_compiled_launches.py " + " ".join(argv or sys.argv[1:])}
    for i, g in enumerate(graphs):
        print(f"graph {i}: {g['fused_kernels']} fused kernels, {g['library_calls']} library calls "
              f"({', '.join(f'{k} {v}' for k, v in list(g['library'].items())[:6])})")
    print(f"compiled launches per step (forward + backward): {result['launches']}, eager operators "
          f"{eager['forward'] + eager['backward']}")
    print(f"kept for the backward: eager {eager['kept_for_backward_bytes'] / 2**30:.3f} GiB, compiled "
          f"{recorder.bytes / 2**30:.3f} GiB")
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
