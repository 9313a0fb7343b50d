#!/usr/bin/env bash
# `bash benchmarks/run_gpu.sh` (or `... ranking`): the three KB-scale benchmarks at ViT-B/32 sizes on one GPU, each
# under a time limit: about 4 minutes expected, 9.8 at most (an H100 or H200; see benchmarks/README.md, "GPU", for the
# device-tool call that runs this). `bash benchmarks/run_gpu.sh training`: the training step (issue 3's check),
# B/32, batch 128, fp32, bf16 autocast, + fused AdamW, + torch.compile, 5 minutes at most. Two device calls, each
# within the 10-minute limit.
# Tables go to $OUT/tables.md, results to $OUT/*.json ($OUT: set by the device tool; else benchmarks/gpu_results).
# Wheels found in .whl/ (faiss-cpu; transformers >= 5.24 where the machine's image has an older one) are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_results}"
mkdir -p "$OUT"
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
  python3 -c "import faiss; print('faiss', faiss.__version__)" 2>/dev/null || echo "faiss: not installed (IVF skipped)"
} | tee "$TABLES"

status=0
bench() {  # bench NAME LABEL LIMIT_SECONDS ARGS...
  local name=$1 label=$2 limit=$3
  shift 3
  echo -e "\n## $label\n\n\`python benchmarks/$name.py --device cuda $*\` ($(date -u '+%H:%M:%S UTC'))\n" | tee -a "$TABLES"
  timeout "$limit" python3 "benchmarks/$name.py" --device cuda --json "$OUT/$label.json" "$@" 2>&1 | tee -a "$TABLES"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "**$label exited with status $rc** (124: its time limit)" | tee -a "$TABLES"
    status=1
  fi
}

if [ "${1:-ranking}" = training ]; then
  # Both CLIP passes, the matcher, the loss, backward and AdamW; 50 timed steps per variant after 5 warm-up steps:
  # fp32 (the recipe), bf16 autocast, + the fused AdamW of train_accelerate.py, + torch.compile (last: it compiles
  # for a minute or more; each variant's time is printed as soon as it is measured).
  bench bench_training training_b32_batch128 300 --model b32 --batch 128 --steps 50 --warmup 5 \
    --variants float32,bfloat16,bfloat16+fused,bfloat16+fused+compile
  exit $status
fi

# The fused G2L kernel's first compilation, and its scores and ranks against the PyTorch path (fp32 and bf16);
# launch variants (8/16 warps, TF32x3 float32 products) timed and compared the same way.
bench check_kernel fused_kernel_check 120 --model b32 --sizes 4096
# (a) Exact ranking at WikiMEL's KB size: 256 mentions for the exact ranker (fp32 and bf16), 40 for the naive loop.
bench bench_exact_ranking exact_ranking_110k 120 --model b32 --sizes 109976 --mentions 256 --naive-mentions 40
# ... and the same exact ranker with the G2L of plain PyTorch instead of the fused kernel (fp32 only).
M3EL_G2L_KERNEL=torch bench bench_exact_ranking exact_ranking_110k_pytorch_g2l 50 --model b32 --sizes 109976 \
  --mentions 128 --naive-mentions 20 --fast-dtype none
# (c) Entity encoding from preprocessed tensors: the authors' path, EntityIndex in fp32 and with a bf16 model.
bench bench_entity_encoding entity_encoding 60 --model b32 --sizes 8192
# (b) Two-stage retrieval: 100k entities (fp32 index; stage 1 on the GPU with torch, and faiss IVF on the CPU) ...
ivf=",ivf"
python3 -c "import faiss" 2>/dev/null || ivf=""
bench bench_two_stage two_stage_100k 90 --model b32 --sizes 100000 --backends "torch$ivf" --k 0.1%,1%,2% \
  --mentions 256
# ... and 1M entities (bf16 index, 18 GiB; stage 1 with torch on the GPU).
bench bench_two_stage two_stage_1m 150 --model b32 --sizes 1000000 --backends torch --k 0.1%,1% --mentions 256 \
  --index-dtype bfloat16
exit $status
