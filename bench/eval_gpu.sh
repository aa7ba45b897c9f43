#!/usr/bin/env bash
# The quality evaluation on a lent GPU box, in one call: `appliance eval` zero-shot (zs) and
# with --few-shot 5 (fs5), by default over seeds 0, 1, 2, all runs side by side (each 2 CPU
# threads and the GPU; about 2 minutes a run on an H200). RUNS picks others: "fs5:3 zs:2".
# The runs' report.json files come back in $OUT/reports.tar as <mode>-seed<N>.json, with their
# pixel_counts.npz in <mode>-seed<N>/ (the device returns at most 8 files); unpack and combine
# them here with
#   tar -C DIR -xf reports.tar && python bench/eval_combine.py DIR
# Needs: the magnetic tile photos in DATA (default evaldata/magnetic-tile), and the wheels of the
# appliance's pure-Python dependencies the device image lacks in .whl/ (bench/README.md says
# which). Knowledge retrieval's embedder (88 MB) does not travel: an episode whose policy asks
# for knowledge gets the tool's error and goes on (the report's per-attempt judge verdicts show
# how many attempts were refused, after which the scripted policy asks).
set -u
DATA=${DATA:-evaldata/magnetic-tile}
OUT=${OUT:-/tmp/eval-gpu}
SEEDS=${SEEDS:-0 1 2}
DEVICE=${DEVICE:-cuda}
EVAL_ARGS=${EVAL_ARGS:-}  # e.g. "--detector-seeds 3", or "--train-size 20 --epochs 1" to smoke-test
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$OUT/device.txt"
python3 -c "import torch, numpy, cv2; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__)" | tee -a "$OUT/device.txt"
start=$(date +%s)
if [ -z "${RUNS:-}" ]; then
    RUNS=""
    for mode in zs fs5; do for seed in $SEEDS; do RUNS="$RUNS $mode:$seed"; done; done
fi
mkdir -p /tmp/ev-reports
pids=()
for run in $RUNS; do
    mode=${run%%:*} seed=${run##*:}
    shots=0
    [ "$mode" = fs5 ] && shots=5
    (
        python3 -m appliance.cli.main eval --normal "$DATA/MT_Free" --defects "$DATA" \
            --out "/tmp/ev-$mode-$seed" --seed "$seed" --few-shot "$shots" --device "$DEVICE" \
            --threads 2 $EVAL_ARGS --no-generation-metrics --no-progress > "/tmp/ev-$mode-$seed.log" 2>&1
        echo "rc=$? after $(( $(date +%s) - start )) s" >> "/tmp/ev-$mode-$seed.log"
        cp "/tmp/ev-$mode-$seed/report.json" "/tmp/ev-reports/$mode-seed$seed.json" 2>/dev/null
        # The per-photo counts, for the combined report's bootstrap range.
        mkdir -p "/tmp/ev-reports/$mode-seed$seed"
        cp "/tmp/ev-$mode-$seed/pixel_counts.npz" "/tmp/ev-reports/$mode-seed$seed/" 2>/dev/null
    ) &
    pids+=($!)
done
wait "${pids[@]}"
tar -C /tmp/ev-reports -cf "$OUT/reports.tar" .
for log in /tmp/ev-*.log; do echo "== $log"; cat "$log"; done > "$OUT/logs.txt"
grep -h "rc=" "$OUT/logs.txt"
echo "all done in $(( $(date +%s) - start )) s"
