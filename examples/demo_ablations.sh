#!/usr/bin/env bash
# Train the demo model and its ablations (text only, image only, no ICL, bidirectional) one after the other and
# print their test results as a markdown table. About 3 minutes a run on 2 CPU cores.
# Usage: bash examples/demo_ablations.sh [OUTPUT_ROOT]
set -euo pipefail
root=${1:-m3el-demo-ablations}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root"
run() {
  local name=$1; shift
  if [ ! -f "$root/$name/test_results.json" ]; then
    accelerate launch --num_processes 1 "$here/train_accelerate.py" --output_dir "$root/$name" \
      --demo_dir "$root/demo-data" "$@" > "$root/$name.log" 2>&1
  fi
}
run full
run text_only --use_image_matching false --use_cross_modal_matching false
run image_only --use_text_matching false --use_cross_modal_matching false
run no_icl --use_icl false
run bidirectional --cross_modal bidirectional
python - "$root" <<'PY'
import json, sys, os
root = sys.argv[1]
rows = [("full (text_to_image)", "full"), ("text only", "text_only"), ("image only", "image_only"),
        ("no ICL", "no_icl"), ("bidirectional", "bidirectional")]
print("| model | MR | MRR | Hits@1 | Hits@3 | Hits@5 | Hits@10 | Hits@20 |")
print("|---|---|---|---|---|---|---|---|")
for label, name in rows:
    r = json.load(open(os.path.join(root, name, "test_results.json")))
    print(f"| {label} | {r['mr']:.3f} | {r['mrr']:.4f} | " + " | ".join(f"{r[f'hits@{k}']:.4f}" for k in (1, 3, 5, 10, 20)) + " |")
PY
