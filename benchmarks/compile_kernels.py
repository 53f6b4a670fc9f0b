"""Compile catseg's Triton kernels for an NVIDIA GPU architecture on any machine (no GPU needed: Triton's own ptxas)
and report each autotuning configuration's registers per thread, spill stack and tensor-core instructions: what can be
checked of the GPU code without a GPU. A configuration that spills (stack > 0) keeps part of its tiles in local
memory; one whose matrix products show as mma.sync rather than wgmma on sm_90 takes the pre-Hopper tensor-core path.

    python benchmarks/compile_kernels.py                  # sm_90 (H100 / H200), the presets' widths, bf16
    python benchmarks/compile_kernels.py --arch 80 --dtype fp32
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from catseg import kernels  # noqa: E402  (run as a script from anywhere)
from catseg.files import write_json_atomic  # noqa: E402

_FLOAT32_OUTPUTS = ("kv_ptr", "z_ptr")  # the class summary's, whatever the compute dtype


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FLOAT32_OUTPUTS else f"*{dtype}"
        else:  # (float arguments are constexprs: torch.compile would type a runtime float fp64)
            sig[name] = "i32"
    return sig


def _resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split())
    return {"registers": int(fields["REG"]), "spill_stack_bytes": int(fields["STACK"])}


def compile_config(fn, dtype: str, arch: int, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile kernel `fn` with these constexprs for sm_<arch>; its resource usage."""
    names = list(inspect.signature(fn).parameters)
    source = ASTSource(kernels._compiled(fn), _signature(fn, dtype, constexprs),
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    # Hopper's warpgroup matrix instructions (wgmma) against the older warp-level ones (mma.sync): which tensor-core
    # path the configuration's matrix products take
    return {**_resource_usage(compiled.asm["cubin"]), "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync")}


def widths(preset_width: int = 128, heads: int = 4, window: int = 12, mlp_ratio: int = 4) -> dict:
    """Each kernel's fixed constexprs at a preset's aggregation widths (the presets: 128 channels, 4 heads, windows
    of 12; the shifted-window variants)."""
    hidden, d = preset_width * mlp_ratio, preset_width // heads
    common = dict(DOT_F32=False, TF32=False)
    return {
        "_residual_mlp_kernel": dict(C=preset_width, HIDDEN=hidden, RELU=False, eps=1e-5, **common),
        "_class_summary_kernel": dict(C=preset_width, D=d, eps=1e-5, **common),
        "_class_update_kernel": dict(C=preset_width, D=d, HIDDEN=hidden, RELU=True, eps1=1e-5, eps2=1e-5,
                                     attn_eps=1e-6, **common),
        "_window_qkv_kernel": dict(C=preset_width, WINDOW=window, SHIFT=window // 2, eps=1e-5, **common),
        "_window_output_kernel": dict(C=preset_width, D=d, HIDDEN=hidden, WINDOW=window, SHIFT=window // 2,
                                      RELU=False, eps2=1e-5, **common),
        "_window_block_kernel": dict(C=preset_width, D=d, HIDDEN=hidden, WINDOW=window, SHIFT=window // 2,
                                     RELU=False, scale=d ** -0.5, eps2=1e-5, **common),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="the compute dtype")
    p.add_argument("--width", type=int, default=128, help="the aggregation's width (embed_dim)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=12, help="the Swin window")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    for name, fixed in widths(args.width, args.heads, args.window).items():
        fn = getattr(kernels, name)
        for meta, warps, stages in kernels._CONFIGS[name]:
            row = {"kernel": name, **meta, "num_warps": warps, "num_stages": stages, "arch": args.arch,
                   "dtype": args.dtype, **compile_config(fn, args.dtype, args.arch, {**fixed, **meta}, warps, stages)}
            rows.append(row)
            print(f"{name:24s} {json.dumps(meta):32s} warps {warps} stages {stages}: {row['registers']:3d} registers, "
                  f"spill stack {row['spill_stack_bytes']:4d} bytes, wgmma {row['wgmma']:3d}, mma.sync "
                  f"{row['mma_sync']:3d}", flush=True)
    if args.json:
        write_json_atomic(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
