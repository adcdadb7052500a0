#!/usr/bin/env bash
# Reproduce the shipped default adapter (zyke_daemon/shipped_adapters/npc-default) from the repo, end to end:
# data engine -> LoRA training -> evaluation on the held-out splits -> ship into the daemon package.
#
#   bash training/make_default_adapter.sh            # about 80 min of training on 2 CPU cores, 7 min of evaluation
#
# Every step is deterministic from its seed; on a GPU machine the training step takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-build/npc-default}
THREADS=${THREADS:-2}

# 1. the generated rows must be exactly what the engine writes (fails if someone edited them by hand)
$PY training/data/generate.py --check

# 2. train: the generated rows plus the hand-written rows three times (the quality core weighs triple).
#    Two stages, as the shipped adapter was made: 600 steps on a 600-step cosine schedule, then the same run
#    continued from its step-600 checkpoint to 1,200 steps (the schedule resumes on the 1,200-step cosine, at
#    about half the peak rate). 600 steps had seen 0.58 of an epoch and the loss was still falling; the second
#    stage took held-out spurious actions from 7.1% to 2.9% and emotions from 0.47 to 0.54 (training/README.md).
RECIPE="zyke-train train --data training/data/npc_generated_train.jsonl --data training/data/npc_train.jsonl \
--data training/data/npc_train.jsonl --data training/data/npc_train.jsonl --output-dir $OUT --max-steps 600 --batch-size 4 --lr 1.5e-3 --lora-r 16 \
--lora-alpha 32 --lora-dropout 0 --lora-layers 12 --max-length 448 --save-every 50 --threads $THREADS \
--decision-weight 5 --max-action-share none=0.3"
$PY -m zyke_train ${RECIPE#zyke-train }
$PY -m zyke_train ${RECIPE#zyke-train } --max-steps 1200 --resume-latest
RECIPE="$RECIPE; then the same with --max-steps 1200 --resume-latest"

# 3. ship it (half precision) so the evaluation below serves exactly the shipped files by name
$PY -m zyke_train ship "$OUT/adapter" --recipe "$RECIPE"

# 4. evaluate base vs the shipped default on both held-out splits, seen/unseen reported separately,
#    greedy and likelihood-scored actions side by side
$PY -m zyke_train evaluate --npc training/data/npc_heldout.jsonl --npc training/data/npc_generated_heldout.jsonl \
    --seen-data training/data/npc_train.jsonl --seen-data training/data/npc_generated_train.jsonl \
    --adapter npc-default --score-actions --threads "$THREADS" --report training/reports/npc_default_eval.json

# 5. record the evaluation in the shipped manifest (same files, same hashes)
$PY -m zyke_train ship "$OUT/adapter" --recipe "$RECIPE" --report training/reports/npc_default_eval.json
