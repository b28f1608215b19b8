#!/usr/bin/env bash
# DeiT-S (random weights) through onnxruntime's CPU provider at batch 1 and 32: dense vs each config of
# deit_small_configs.yaml, each exported to ONNX and checked against PyTorch before it is timed.
# Writes benchmarks/onnxruntime_deit_small.md. Run it on a quiet machine (nothing else on the cores).
# Overridable: AUTOPRUNE (the command), THREADS, MODEL_ARGS, CONFIGS, OUT, ROUNDS_32, ROUNDS_1, BATCHES
# ("32" for batch 32 alone), FLOOR ("--no-floor" leaves out the slicing-floor rows: half the exports)
# (a quick check on a small model: MODEL_ARGS="--model vit_tiny_patch16_224 --model-kwargs img_size=32,patch_size=8,depth=4"
#  CONFIGS=benchmarks/quickstart_configs.yaml OUT=/tmp/check.md ROUNDS_32=1 ROUNDS_1=1).
set -euo pipefail
cd "$(dirname "$0")/.."
AUTOPRUNE=${AUTOPRUNE:-autoprune}
THREADS=${THREADS:-2}
MODEL_ARGS=${MODEL_ARGS:-}
CONFIGS=${CONFIGS:-benchmarks/deit_small_configs.yaml}
OUT=${OUT:-benchmarks/onnxruntime_deit_small.md}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for batch in ${BATCHES:-32 1}; do
    rounds_var=ROUNDS_$batch
    # shellcheck disable=SC2086  # MODEL_ARGS holds several words
    $AUTOPRUNE bench --backend onnxruntime $MODEL_ARGS ${FLOOR:-} --config "$CONFIGS" --threads "$THREADS" \
        --batch-size "$batch" --rounds "${!rounds_var:-$([ "$batch" = 1 ] && echo 51 || echo 7)}" --out "$TMP/b$batch.md"
done
{
    echo "# Token-reduced models through onnxruntime on CPU"
    echo
    echo "$(nproc)-core $(lscpu | sed -n 's/^Model name: *//p') CPU, made by \`THREADS=$THREADS BATCHES=\"${BATCHES:-32 1}\" FLOOR=${FLOOR:-} bash benchmarks/onnxruntime_deit_small.sh\`. Every model is exported with"
    echo "\`autoprune.export_onnx\` (opset 18, checked against PyTorch within 1e-4) and timed interleaved with the"
    echo "dense model. Goal: speedup / ideal >= 0.9 at batch 32."
    for batch in ${BATCHES:-32 1}; do
        echo
        echo "## Batch $batch"
        echo
        cat "$TMP/b$batch.md"
    done
} > "$OUT"
echo "wrote $OUT"
