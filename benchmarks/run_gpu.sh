#!/usr/bin/env bash
# `bash benchmarks/run_gpu.sh`: the GPU figures of issues 3 and 4 at ViT-B/32 sizes on one GPU (an H100 or H200; see
# benchmarks/README.md, "GPU", for the device-tool call), in one device call. Steps run in order of importance, each
# under its own time limit and all under one deadline (BUDGET_S seconds from the start, default 560, inside the
# device tool's 600): a step is cut to the time left, and skipped (and said so) when less than 20 s is left. About 5
# minutes expected.
#   1. the fused G2L kernel: first compilation, scores and ranks against PyTorch, launch variants
#   2. (issue 4 a) exact ranking at WikiMEL's KB size against the authors' loop, fp32 and bf16; bf16 against fp32
#      on the trained demo model (its folder and test inputs carried: benchmarks/README.md, "How to run")
#   3. (issue 3) the training step, B/32, batch 128, 200 timed steps, fp32 and bf16 autocast + fused AdamW
#   4. (issue 4 c) entity encoding from preprocessed tensors
#   5. (issue 4 b) two-stage retrieval at 1M entities, then at 100k
#   6. extras: the exact ranker with PyTorch's G2L instead of the kernel; the training step with bf16 autocast alone
#      (the authors' bf16 setting) and with torch.compile; entity encoding from image files with reading threads
# `bash benchmarks/run_gpu.sh kernel`: issue 4's figures, in about 6-7 minutes (BUDGET_S default 420; device call
# timeout_s=470): the kernel's check and launch variants, exact ranking at WikiMEL's size, bf16 against fp32 on the
# trained demo model (when carried), entity encoding, a profile of the ranker's calls, exact ranking again with the
# pruned pairs by the masked grid and without refined bounds, and two-stage retrieval, all with the fastest launches
# that agree.
# `bash benchmarks/run_gpu.sh half`: the fast mode with a float16 index (kernel check, the trained demo model, exact
# ranking at WikiMEL's size, two-stage at 1M), in about 3 minutes (device call timeout_s=360).
# `bash benchmarks/run_gpu.sh training`: the training step alone, all four variants, 50 timed steps (5 minutes at
# most), for a second call.
# Tables go to $OUT/tables.md (as each step ends), results to $OUT/*.json ($OUT: set by the device tool; else
# benchmarks/gpu_results); at the end the JSON results but launch.json are packed into $OUT/results.tar.gz (the device
# tool brings back 8 files at most: a kernel run writes 9 JSON files); unpack with `tar -xzf results.tar.gz`. Wheels
# found in .whl/ (faiss-cpu; transformers >= 5.24 where the machine's image has an older one) are installed into
# /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_results}"
mkdir -p "$OUT"
START=$SECONDS
default_budget=560
[ "${1:-all}" = kernel ] && default_budget=420
[ "${1:-all}" = half ] && default_budget=300
BUDGET_S="${BUDGET_S:-$default_budget}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
TABLES="$OUT/tables.md"
{
  echo "# GPU benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "$(nproc) CPU cores"
  python3 -c "import torch, transformers; print('torch', torch.__version__, '- transformers', transformers.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  python3 -c "import faiss; print('faiss', faiss.__version__)" 2>/dev/null || echo "faiss: not installed (IVF skipped)"
} | tee "$TABLES"

status=0
finish() {  # finish: the closing line, the JSON results (launch.json apart) packed into one file, the exit status
  echo -e "\n(run_gpu.sh $1: $((SECONDS - START)) s)" | tee -a "$TABLES"
  local results=()
  for file in "$OUT"/*.json; do
    [ -f "$file" ] && [ "$(basename "$file")" != launch.json ] && results+=("$(basename "$file")")
  done
  if [ "${#results[@]}" -gt 0 ] && tar -czf "$OUT/results.tar.gz" -C "$OUT" "${results[@]}"; then
    (cd "$OUT" && rm -f "${results[@]}")
  fi
  exit $status
}
demo_precision() {  # demo_precision ARGS...: the step, when the demo model and its test inputs were carried
  if [ -d m3el-demo/model ] && [ -f m3el-demo/precision_inputs.safetensors ]; then
    bench demo_precision demo_precision 40 --model m3el-demo/model --inputs m3el-demo/precision_inputs.safetensors "$@"
  else
    echo -e "\n## demo_precision\n\nskipped: m3el-demo/model and m3el-demo/precision_inputs.safetensors were not carried" \
      "(benchmarks/README.md, \"How to run\")" | tee -a "$TABLES"
  fi
}
bench() {  # bench NAME LABEL LIMIT_SECONDS ARGS...: one step, cut to the time left before the deadline
  local name=$1 label=$2 limit=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo -e "\n## $label\n\nskipped: ${left} s left of the ${BUDGET_S} s budget" | tee -a "$TABLES"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo -e "\n## $label\n\n\`python benchmarks/$name.py --device cuda $*\` ($(date -u '+%H:%M:%S UTC'), limit ${limit} s)\n" \
    | tee -a "$TABLES"
  timeout "$limit" python3 "benchmarks/$name.py" --device cuda --json "$OUT/$label.json" "$@" 2>&1 | tee -a "$TABLES"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "**$label exited with status $rc** (124: its time limit)" | tee -a "$TABLES"
    status=1
  fi
}

if [ "${1:-all}" = kernel ]; then
  # The fused kernel's figures alone (about 5 minutes): its check and launch variants, whose fastest launches that
  # agree (launch.json) the exact ranking at WikiMEL's size and the two-stage retrieval then use.
  bench check_kernel fused_kernel_check 130 --model b32 --sizes 4096 --budget-s 115 \
    --launch-out "$OUT/launch.json"
  launch=()
  [ -f "$OUT/launch.json" ] && launch=(--launch "$OUT/launch.json")
  # the target figure first: exact ranking at WikiMEL's size against the authors' loop
  bench bench_exact_ranking exact_ranking_110k 90 --model b32 --sizes 109976 --mentions 256 --naive-mentions 40 \
    "${launch[@]}"
  # bf16 against float32 on the trained demo model, through the kernels: the target's MRR figure
  demo_precision "${launch[@]}"
  # entity encoding from preprocessed tensors (the model's fingerprint hashed beside it since session 5): the
  # target's encoding figure
  bench bench_entity_encoding entity_encoding 60 --model b32 --sizes 16384
  # where a scores() and a rank() call spend their time (every kernel's device time; rank() by phase), and the fused
  # kernels' rate
  bench profile_ranking ranking_profile 50 --model b32 --sizes 32768 --mentions 128 "${launch[@]}"
  # the same with the pruned ranker's undecided pairs scored through the masked grid (the default: the candidates
  # kernel, each mention's list)
  bench bench_exact_ranking exact_ranking_110k_grid 70 --model b32 --sizes 109976 --mentions 256 \
    --naive-mentions 10 --pruned-scoring grid "${launch[@]}"
  # and without the refinement of the undecided pairs' bounds (one G2L block first), to see what it saves here
  bench bench_exact_ranking exact_ranking_110k_unrefined 50 --model b32 --sizes 109976 --mentions 256 \
    --naive-mentions 10 --no-refine "${launch[@]}"
  # (stage 1 by torch's products over the dot-product parts, and by `estimate`: EntityIndex.topk(candidates=K))
  bench bench_two_stage two_stage_1m 75 --model b32 --sizes 1000000 --backends torch,estimate --k 0.1%,1% \
    --mentions 256 --index-dtype bfloat16 "${launch[@]}"
  bench bench_two_stage two_stage_100k 40 --model b32 --sizes 100000 --backends torch --k 0.1%,1%,2% \
    --mentions 256 "${launch[@]}"
  finish kernel
fi

if [ "${1:-all}" = half ]; then
  # The fast mode in float16 (about 3 minutes; BUDGET_S default 300, device call timeout_s=360): the kernel checked
  # in float16, then half precision against float32 on the trained demo model (when carried), exact ranking at
  # WikiMEL's size with a float16 index, and two-stage retrieval at 1M entities with a float16 index.
  bench check_kernel fused_kernel_check_float16 70 --model b32 --sizes 4096 --dtypes float16 --no-variants
  demo_precision
  bench bench_exact_ranking exact_ranking_110k_float16 90 --model b32 --sizes 109976 --mentions 256 \
    --naive-mentions 10 --fast-dtype float16
  bench bench_two_stage two_stage_1m_float16 75 --model b32 --sizes 1000000 --backends torch,estimate --k 0.1%,1% \
    --mentions 256 --index-dtype float16
  finish half
fi

if [ "${1:-all}" = training ]; then
  # Both CLIP passes, the matcher, the loss, backward and AdamW; 50 timed steps per variant after 5 warm-up steps:
  # fp32 (the recipe), bf16 autocast, + the fused AdamW of train_accelerate.py, activation checkpointing (fp32, and
  # bf16 with the fused AdamW), + torch.compile (last: it compiles for a minute or more; each variant's line is
  # printed as soon as it is measured).
  BUDGET_S=360 bench bench_training training_b32_batch128 360 --model b32 --batch 128 --steps 50 --warmup 5 \
    --variants float32,bfloat16,bfloat16+fused,float32+ckpt,bfloat16+fused+ckpt,bfloat16+fused+compile
  finish training
fi

# 1. The fused G2L kernel's first compilation, and its scores and ranks against the PyTorch path (fp32 and bf16);
#    launch variants timed and compared the same way; the fastest that agree go to launch.json for steps 2 and 5.
bench check_kernel fused_kernel_check 130 --model b32 --sizes 4096 --budget-s 115 \
    --launch-out "$OUT/launch.json"
launch=()
[ -f "$OUT/launch.json" ] && launch=(--launch "$OUT/launch.json")
# 2. Exact ranking at WikiMEL's KB size: 256 mentions for the exact ranker (fp32 and bf16), 40 for the naive loop.
bench bench_exact_ranking exact_ranking_110k 120 --model b32 --sizes 109976 --mentions 256 --naive-mentions 40 \
  "${launch[@]}"
#    And bf16 against float32 on the trained demo model, through the kernels (when carried).
demo_precision "${launch[@]}"
# 3. The training step of issue 3: a few hundred steps in fp32 (the recipe) and bf16 autocast with the fused AdamW
#    of train_accelerate.py.
bench bench_training training_b32_batch128 150 --model b32 --batch 128 --steps 200 --warmup 10 \
  --variants float32,bfloat16+fused
# 4. Entity encoding from preprocessed tensors: the authors' path, EntityIndex in fp32 and with a bf16 model.
bench bench_entity_encoding entity_encoding 60 --model b32 --sizes 8192
# 5. Two-stage retrieval at 1M entities (bf16 index, 18 GiB; stage 1 with torch on the GPU, and by `estimate`:
#    EntityIndex.topk(candidates=K), the pipeline's) ...
bench bench_two_stage two_stage_1m 150 --model b32 --sizes 1000000 --backends torch,estimate --k 0.1%,1% \
  --mentions 256 --index-dtype bfloat16 "${launch[@]}"
# ... and at 100k (fp32 index; stage 1 on the GPU with torch, and faiss IVF on the CPU).
ivf=",ivf"
python3 -c "import faiss" 2>/dev/null || ivf=""
bench bench_two_stage two_stage_100k 90 --model b32 --sizes 100000 --backends "torch$ivf" --k 0.1%,1%,2% \
  --mentions 256 "${launch[@]}"
# 6. Extras, as time allows: the exact ranker with the G2L of plain PyTorch instead of the fused kernel (fp32) ...
M3EL_G2L_KERNEL=torch bench bench_exact_ranking exact_ranking_110k_pytorch_g2l 50 --model b32 --sizes 109976 \
  --mentions 128 --naive-mentions 20 --fast-dtype none
# ... and the training step with bf16 autocast alone (the authors' bf16 setting), with activation checkpointing
# (fp32 and bf16: its memory and time) and with torch.compile.
bench bench_training training_b32_batch128_more 180 --model b32 --batch 128 --steps 50 --warmup 5 \
  --variants bfloat16,float32+ckpt,bfloat16+fused+ckpt,bfloat16+fused+compile
# ... and EntityIndex.build from JPEG files with 0, 4, 8 and 15 threads reading the images ahead of the model.
bench bench_image_reading image_reading_b32 60 --model b32 --sizes 4096 --workers 4,8,15 --batch-size 256
finish all
