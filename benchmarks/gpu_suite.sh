#!/usr/bin/env bash
# The GPU benchmarks on a GPU machine without a package index (docs/speed.md): install the wheels carried in
# .whl (python -m benchmarks.device_wheels fills it on a machine with pip access), then run the given
# GPU_RUNS entries one after another, each recorded in benchmarks/RESULTS.md, which is copied to $OUT after
# every entry so a run stopped by a time limit still leaves what finished. Logs: $OUT/suite.log (wheels,
# GPU, versions) and $OUT/gpu_run_N.log; with six entries that is eight files in $OUT.
# ENTRY_TIMEOUT (seconds, default none) stops an entry that runs longer, so that one hung entry does not
# take the whole run; the next entry then runs.
#
# On an NVIDIA H200 (2026-11-30) the machine started in ~30 s and entries 0 and 3 took 279 s and 199 s
# (benchmarks/RESULTS.md, "2026-11-30, NVIDIA H200"). By those rates the entries still to run fit in two
# runs, the first about 550 s, with the checkout and its .whl/ copied to the machine and OUT set:
#
#   ENTRY_TIMEOUT=240 bash benchmarks/gpu_suite.sh 7 1 4 2
#   ENTRY_TIMEOUT=200 bash benchmarks/gpu_suite.sh 6 5
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1
log="$OUT/suite.log"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$log" 2>&1 \
    || { tail -20 "$log"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, diffusers, ray, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$log"
limit=()
[ -n "${ENTRY_TIMEOUT:-}" ] && limit=(timeout -k 15 "$ENTRY_TIMEOUT")
status=0
for i in "$@"; do
    echo "== GPU_RUNS[$i] $(date -u +%T)" | tee -a "$log"
    ${limit[@]+"${limit[@]}"} python3 -m benchmarks gpu "$i" > "$OUT/gpu_run_$i.log" 2>&1 || { status=$?; echo "exit $status" | tee -a "$log"; }
    grep -E "^(ratios|\| \(|identical|\(c\) |peak|model:|batch |\(a\) )" "$OUT/gpu_run_$i.log" | tail -20
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
done
echo "== end $(date -u +%T)" | tee -a "$log"
exit $status
