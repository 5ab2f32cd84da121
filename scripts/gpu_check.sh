#!/usr/bin/env bash
# GPU check (issue 6), offline: gpt2-medium with RANDOM weights (not the pretrained model; only
# the timings mean anything) through the chapter's two epochs on the chapter's data with the
# fast path (the defaults), then the 110 test answers; minutes printed beside the chapter's
# 0.86 min of training on an A100 (and about a minute of answering). Then `python -m sft.bench`
# on CUDA: the chapter's way against the fast path on gpt2-small.
#
#   bash scripts/gpu_check.sh            # needs a CUDA GPU; about 5 minutes on an H100
#   RUNS=/tmp/x bash scripts/gpu_check.sh
#
# A random model never writes <|endoftext|>, so every answer runs to the chapter's 256 new
# tokens: answering here is the worst case of the chapter's fine-tuned model, which stops early.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/sft-gpu-check}
NAME=gpu-check-$(date +%Y%m%d-%H%M%S)

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA GPU: this script measures the GPU path"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16: {torch.cuda.is_bf16_supported()}")
EOF

python -m sft train --model "gpt2-medium (355M)" --weights random --device cuda \
  --runs-root "$RUNS" --name "$NAME" --response-tokens 256 --progress plain

python - "$RUNS/$NAME" <<'EOF'
import json, sys
events = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
done = next(e for e in events if e["type"] == "done")
saved = next(e for e in events if e["type"] == "saved")
answered = [e for e in events if e["type"] == "responses"][-1]
print(f"gpt2-medium (RANDOM weights), 2 epochs, {done['step'] + 1} steps: training "
      f"{done['elapsed'] / 60:.2f} min (the chapter: 0.86 min on an A100)")
print(f"answering {answered['total']} test prompts (up to 256 new tokens each): "
      f"{(answered['time'] - saved['time']) / 60:.2f} min (the chapter: about 1 min)")
EOF

python -m sft.bench --device cuda --gen-fp32-too
