#!/usr/bin/env bash
# Every GPU figure of the README's speed table in one call, on a machine with one CUDA GPU.
#
#   bash benchmarks/gpu_bench.sh OUT_DIR [VARIANT ...]
#
# Runs from the repository root with the machine's own python3 (torch, timm, einops and numpy preinstalled).
# Wheels for the rest (open_clip_torch, ftfy, wcwidth, timm) may lie in .whl/ (no network needed): they are
# installed into a private folder first. Fetch them where pip works (the GPU machine's Python is 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
#     timm==1.0.31
# (pinned: two versions of one package in .whl/ make pip refuse the whole install). The .whl/ folder is ignored by
# git: a remote runner must be told to carry it. The script stops before any GPU work if a variant is unknown or
# the packages do not import.
# Variants with --trace leave Chrome traces of their profiled calls in OUT_DIR/<name>_trace/.
# `tests` runs the GPU-only tests (tests/test_gpu.py: graph capture eager and compiled, bf16 weights, channels-last,
# compiled training with and without CUDA graphs, the fused Triton kernels), `tests_fused` only the kernels' ones,
# `tests_train` only the training ones (compiled steps against eager ones, with CUDA graphs too; no host syncs) and
# the guidance Swin's fused window attention;
# `decoder` times the decoder alone in each form, with each form's kernels (benchmarks/bench_decoder.py --profile);
# `class_aggregation` one class aggregation block alone: products, Triton kernels (bench_class_aggregation.py);
# `segment` catseg segment's images/s on a folder of photos, one thread against I/O threads (bench_segment.py).
# `merge` patch inference after the model alone: views' sigmoid, merge, argmax, scores (bench_merge.py).
# Compiled inference (`--compile`, as Segmenter(compile=True)) compiles the aggregation, the decoder and the image
# encoders and runs the decoder's upsampling as a stencil; `b_compile_no_stencil` without the stencil.
# `--fused-kernels` runs the Swin blocks as Triton kernels (as Segmenter); `b_compile_fused_class` the class blocks'.
# A copy of an older catseg/ under .baseline/ is benchmarked side by side ("baseline" variants). Each run has its
# own time limit, so one failure leaves the others' figures; results land in OUT_DIR/*.json and *.log (ARCHIVE=path
# keeps a tarball of them after every run), and a summary table is printed last.
set -u
out=${1:?usage: gpu_bench.sh OUT_DIR [VARIANT ...]}
shift
variants=${*:-"b_compile_fused l_compile_fused b_compile tests_train b_compile_fused_sigmoid_first b_compile_c256 b_compile_batch l_compile_batch segment merge tests b_compile_fused_class b_compile_fused_sdpa b_model_cl_ro_stencil l_model_cl_ro_stencil b_compile_ma b_compile_no_stencil b l"}
known=$(grep -oE '^ {8}[a-z0-9_]+\) ' "${BASH_SOURCE[0]}" | tr -d ' )')  # the case labels below
for v in $variants; do
    grep -qx "$v" <<<"$known" || { echo "unknown variant $v; known: $(echo $known)" >&2; exit 2; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
root=$(pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/catseg-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/catseg-site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" >>"$out/gpu.txt" 2>&1 || {
    tail -3 "$out/gpu.txt"; echo "the packages do not import (were the .whl/ wheels carried?)" >&2; exit 1; }
tail -1 "$out/gpu.txt"

# name  time-limit  where  bench arguments
bench() {
    local name=$1 limit=$2 dir=$3; shift 3
    echo "== $name: python -m catseg.bench $*"
    (cd "$dir" && timeout "$limit" python3 -m catseg.bench "$@" ${BENCH_ARGS:-} --json "$out/$name.json") >"$out/$name.log" 2>&1
    echo "   exit $? ($(grep -c '^inference\|^training' "$out/$name.log") figures)"; grep '^inference\|^training' "$out/$name.log"
}

for v in $variants; do
    case $v in
        decoder) for c in "" --compile; do  # the decoder alone: NHWC, NCHW, compiled with the stencil upsampling
                name=decoder${c:+_compiled}
                echo "== $name: python benchmarks/bench_decoder.py $c --profile"
                timeout 240 python3 benchmarks/bench_decoder.py $c --profile --json "$out/$name.json" >"$out/$name.log" 2>&1
                echo "   exit $?"; tail -2 "$out/$name.log"
            done ;;
        class_aggregation) echo "== class_aggregation: python benchmarks/bench_class_aggregation.py --compile --profile"
            timeout 240 python3 benchmarks/bench_class_aggregation.py --compile --profile --json "$out/$v.json" \
                >"$out/$v.log" 2>&1
            echo "   exit $?"; grep "max |difference|" "$out/$v.log" ;;
        segment) echo "== segment: python benchmarks/bench_segment.py (catseg segment on 48 photos, 150 classes)"
            timeout 240 python3 benchmarks/bench_segment.py --preset catseg_vitb16_r101 --images 48 --classes 150 \
                --settings 1:0,1:4,8:4 --json "$out/$v.json" >"$out/$v.log" 2>&1
            echo "   exit $?"; grep "images/s\|median ms" "$out/$v.log" ;;
        merge) echo "== merge: python benchmarks/bench_merge.py (patch inference after the model, ViT-B geometry)"
            for s in 640x640 683x512; do
                timeout 120 python3 benchmarks/bench_merge.py --classes 20,150,847 --size $s --warmup 2 --repeats 10 \
                    --json "$out/${v}_$s.json" >"$out/${v}_$s.log" 2>&1
                echo "   $s exit $?"; grep "classes:" "$out/${v}_$s.log"
            done ;;
        tests) echo "== tests: python -m pytest tests/test_gpu.py"
            timeout 450 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$out/tests.log" 2>&1
            echo "   exit $?"; tail -3 "$out/tests.log" ;;
        tests_train) echo "== tests_train: python -m pytest tests/test_gpu.py -k 'whole_model or never_waits or swin_backbone'"
            timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "whole_model or never_waits or swin_backbone" \
                >"$out/tests_train.log" 2>&1
            echo "   exit $?"; tail -3 "$out/tests_train.log" ;;
        tests_fused) echo "== tests_fused: python -m pytest tests/test_gpu.py -k fused_kernels"
            timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k fused_kernels >"$out/tests_fused.log" 2>&1
            echo "   exit $?"; tail -3 "$out/tests_fused.log" ;;
        b) bench b16 150 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 --profile --trace "$out/b16_trace" ;;
        l) bench l14 150 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20,150,847 ;;
        b_batch) bench b16_batch 120 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150 --batches 8,32 --no-train ;;
        l_batch) bench l14_batch 120 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20,150 --batches 8,32 --no-train ;;
        b_compile_batch) bench b16_compile_batch 300 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150 \
            --batches 8,32 --compile --fused-kernels --no-train ;;
        l_compile_batch) bench l14_compile_batch 300 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20,150 \
            --batches 8,32 --compile --fused-kernels --no-train ;;
        b_keep) bench b16_keep_mlp 100 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20 --no-mlp-recompute ;;
        l_keep) bench l14_keep_mlp 100 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20 --no-mlp-recompute ;;
        b_guess) bench b16_cudnn_guess 150 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 --no-cudnn-benchmark ;;
        l_profile20) bench l14_profile20 100 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20 --profile --no-train ;;
        b_eager) bench b16_eager 100 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 --no-cuda-graphs --no-train ;;
        b_plain) bench b16_plain 100 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 --no-train \
            --no-bf16-weights --no-channels-last ;;
        b_compile) bench b16_compile 300 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 --compile --no-train \
            --profile ;;
        l_compile) bench l14_compile 300 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20,150,847 --compile --no-train ;;
        b_compile_no_stencil) bench b16_compile_no_stencil 300 "$root" --preset "${B:-catseg_vitb16_r101}" \
            --classes 150,847 --compile --no-train --no-stencil-upsampling --profile ;;
        b_model_cl_ro_stencil) bench b16_compile_model_cl_ro_stencil 400 "$root" --preset "${B:-catseg_vitb16_r101}" \
            --compile-model --channels-last --compile-mode reduce-overhead --no-inference --stencil-upsampling ;;
        l_model_cl_ro_stencil) bench l14_compile_model_cl_ro_stencil 400 "$root" --preset "${L:-catseg_vitl14_swinb}" \
            --compile-model --channels-last --compile-mode reduce-overhead --no-inference --stencil-upsampling ;;
        b_compile_fused) bench b16_compile_fused_kernels 300 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 \
            --compile --no-train --fused-kernels --profile ;;
        b_compile_fused_sigmoid_first) bench b16_compile_fused_sigmoid_first 300 "$root" \
            --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 --compile --no-train --fused-kernels --sigmoid-first ;;
        b_compile_fused_class) bench b16_compile_fused_class 300 "$root" --preset "${B:-catseg_vitb16_r101}" \
            --classes 150,847 --compile --no-train --fused-kernels --fused-parts class --profile ;;
        b_compile_fused_sdpa) bench b16_compile_fused_sdpa 300 "$root" --preset "${B:-catseg_vitb16_r101}" \
            --classes 150,847 --compile --no-train --fused-kernels --fused-attention sdpa ;;
        l_compile_fused) bench l14_compile_fused_kernels 300 "$root" --preset "${L:-catseg_vitl14_swinb}" --classes 20,150,847 \
            --compile --no-train --fused-kernels ;;
        b_infer) bench b16_inference 150 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 150,847 --no-train --profile ;;
        b_fused) bench b16_fused_kernels 150 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 150,847 --no-train \
            --fused-kernels --profile ;;
        b_compile_ma) bench b16_compile_max_autotune 400 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 150,847 \
            --compile --compile-mode max-autotune-no-cudagraphs --no-train ;;
        b_compile_c256) bench b16_compile_chunk256 300 "$root" --preset "${B:-catseg_vitb16_r101}" --classes 150,847 --compile \
            --no-train --class-chunk 256 ;;
        b_compile_train) bench b16_compile_train 400 "$root" --preset "${B:-catseg_vitb16_r101}" --compile --no-inference ;;
        l_compile_train) bench l14_compile_train 400 "$root" --preset "${L:-catseg_vitl14_swinb}" --compile --no-inference ;;
        b_model) bench b16_compile_model 400 "$root" --preset "${B:-catseg_vitb16_r101}" --compile-model --no-inference \
            --profile --trace "$out/b16_compile_model_trace" ;;
        b_model_cl) bench b16_compile_model_cl 400 "$root" --preset "${B:-catseg_vitb16_r101}" --compile-model \
            --channels-last --no-inference --profile ;;
        l_model) bench l14_compile_model 400 "$root" --preset "${L:-catseg_vitl14_swinb}" --compile-model --no-inference \
            --profile ;;
        l_model_cl) bench l14_compile_model_cl 400 "$root" --preset "${L:-catseg_vitl14_swinb}" --compile-model \
            --channels-last --no-inference --profile ;;
        b_model_cl_ro) bench b16_compile_model_cl_ro 400 "$root" --preset "${B:-catseg_vitb16_r101}" --compile-model \
            --channels-last --compile-mode reduce-overhead --no-inference ;;
        l_model_cl_ro) bench l14_compile_model_cl_ro 400 "$root" --preset "${L:-catseg_vitl14_swinb}" --compile-model \
            --channels-last --compile-mode reduce-overhead --no-inference ;;
        b_model_cl_cpp) bench b16_compile_model_cl_cpp 450 "$root" --preset "${B:-catseg_vitb16_r101}" --compile-model \
            --channels-last --cpp-wrapper --no-inference --profile ;;
        b_model_ro) bench b16_compile_model_ro 400 "$root" --preset "${B:-catseg_vitb16_r101}" --compile-model \
            --compile-mode reduce-overhead --no-inference ;;
        l_model_ro) bench l14_compile_model_ro 400 "$root" --preset "${L:-catseg_vitl14_swinb}" --compile-model \
            --compile-mode reduce-overhead --no-inference ;;
        b_base) bench b16_baseline 150 "$root/.baseline" --preset "${B:-catseg_vitb16_r101}" --classes 20,150,847 ;;
        l_base) bench l14_baseline 150 "$root/.baseline" --preset "${L:-catseg_vitl14_swinb}" --classes 20,150,847 ;;
        *) echo "unknown variant $v" ;;
    esac
    # ARCHIVE: keep a tarball of everything so far (what a time-limited caller gets back even if cut short)
    [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")"
done
python3 - "$out" <<'PY'
import glob, json, os, sys
def f(v, spec):
    return format(v, spec) if v is not None else format("n/a", spec.rstrip("f").split(".")[0] or "")
print(f"\n{'run':22s} {'classes':>7s} {'batch':>5s} {'ms/img':>8s} {'img/s':>8s} {'peak GiB':>8s} {'later':>6s} "
      f"{'first s':>7s}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))
    name = os.path.basename(path)[:-5]
    for x in r.get("inference", []):  # (the decoder bench's JSON has its own rows)
        print(f"{name:22s} {x['classes']:7d} {x['batch']:5d} {f(x['ms_per_image'], '8.2f')} {f(x['images_per_s'], '8.1f')} "
              f"{(x['peak_memory_bytes'] or 0) / 2**30:8.2f} {(x.get('steady_peak_memory_bytes') or 0) / 2**30:6.2f} "
              f"{f(x.get('first_call_s'), '7.1f')}")
    t = r.get("training")
    if t:
        print(f"{name:22s} {t['classes']:7d} {t['batch']:5d} {f(t['ms_per_step'], '8.2f')} {'train':>8s} "
              f"{(t['peak_memory_bytes'] or 0) / 2**30:8.2f} {(t.get('steady_peak_memory_bytes') or 0) / 2**30:6.2f} "
              f"{f(t.get('first_call_s'), '7.1f')}")
PY
