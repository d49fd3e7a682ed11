#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a machine with one NVIDIA GPU (under 8 minutes in all):
# versions, the kernel tests on CUDA, the compile check for sm_80, sm_90 and this GPU's own cc, and the
# kernel, heads and train-step benchmarks on CUDA. Every log and JSON line goes into OUTDIR.
#
#     bench/device_check.sh OUTDIR                       # run (from anywhere; it cds to the repository)
#     DEVICE_CHECK_DRY=1 bench/device_check.sh OUTDIR    # print the steps and their commands, run nothing
#
# OUTDIR/<step>.log holds a step's output, OUTDIR/<step>.json its last JSON line (benchmarks, compile check),
# OUTDIR/summary.txt and summary.json each step's exit status and seconds. Each step has its own timeout
# and all of them share DEVICE_CHECK_BUDGET_S (default 450 s), so the whole run stays under 8 minutes; a
# failing or timed-out step (exit 124) does not stop the next. Exit status 1 when any step failed.
# bench/train_step.py needs the SmolLM2 weights in $THINKREC_CACHE (default ~/.cache/thinkrec) and the
# shared ML-1M split; TRAIN_STEP_ARGS adds flags to it (e.g. "--model /path/to/model").
set -u

OUT=${1:?usage: bench/device_check.sh OUTDIR}
DRY=${DEVICE_CHECK_DRY:-0}
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-450}
cd "$(dirname "$0")/.." || exit 2
[ -f .venv/bin/activate ] && . .venv/bin/activate
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEADLINE=$(( $(date +%s) + BUDGET_S ))
NAMES=() CODES=() SECONDS_TAKEN=()

# step NAME LIMIT_S CMD...: run CMD under `timeout`, output into OUT/NAME.log (and the terminal), its last
# JSON line into OUT/NAME.json; records the exit status. The limit is cut to what is left of the budget.
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    (( limit > left )) && limit=$left
    if [ "$DRY" = 1 ]; then
        printf '[%s] timeout %ss:' "$name" "$limit"; printf ' %q' "$@"; printf '\n'
        NAMES+=("$name") CODES+=("dry") SECONDS_TAKEN+=(0)
        return
    fi
    if (( limit < 10 )); then
        echo "=== $name: skipped, ${left}s left of the ${BUDGET_S}s budget" | tee "$OUT/$name.log"
        NAMES+=("$name") CODES+=("skipped") SECONDS_TAKEN+=(0)
        return
    fi
    echo "=== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    grep '^{' "$OUT/$name.log" | tail -n 1 > "$OUT/$name.json"
    [ -s "$OUT/$name.json" ] || rm -f "$OUT/$name.json"
    NAMES+=("$name") CODES+=("$rc") SECONDS_TAKEN+=($(( SECONDS - t0 )))
    echo "=== $name: exit $rc after $(( SECONDS - t0 ))s" | tee -a "$OUT/$name.log"
}

# ------------------------------------------------------------------------------------------ environment
step nvidia_smi 30 nvidia-smi
step versions 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
    'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0),
    'cc', torch.cuda.get_device_capability(0))"

# ------------------------------------------------------------------------------------------------ tests
# The kernel tests put their inputs on CUDA when there is one: every Triton path runs compiled, and the
# CUDA-only cases (bf16, M = 100k) run instead of skipping. -n 4: kernel compiles dominate, in parallel.
XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 4")
# shellcheck disable=SC2086
step tests 180 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_lora_mix.py tests/test_yes_head_bce.py \
    tests/test_linear_cross_entropy.py tests/test_model_lora.py tests/test_compile.py -k "not compile_with"

# ---------------------------------------------------------------------------------------- compile check
CC=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(0); print(10 * m + n)' 2>/dev/null)
CCS="80 90"
case " $CCS " in *" ${CC:-none} "*) ;; *) [ -n "$CC" ] && CCS="$CCS $CC" ;; esac
# shellcheck disable=SC2086
step compile_check 120 env TRITON_INTERPRET=0 "$PY" -m thinkrec_kernels.compile_check --cc $CCS --jobs "$(nproc)"

# ------------------------------------------------------------------------------------------- benchmarks
step bench_lora_mix 90 "$PY" bench/bench_lora_mix.py --device cuda --dtype bf16 --repeats 20
step bench_lora_mix_e8 60 "$PY" bench/bench_lora_mix.py --device cuda --dtype bf16 --repeats 20 --experts 8 --quick
step bench_heads 100 "$PY" bench/bench_heads.py --device cuda --budget-s 2
# shellcheck disable=SC2086
step train_step 120 "$PY" bench/train_step.py --device cuda --repeats 5 ${TRAIN_STEP_ARGS:-}

# -------------------------------------------------------------------------------------------- summary
failed=0
{
    echo "step               exit  seconds"
    for i in "${!NAMES[@]}"; do
        printf '%-18s %-7s %s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECONDS_TAKEN[$i]}"
    done
} | tee "$OUT/summary.txt"
json="{"
for i in "${!NAMES[@]}"; do
    [ "${CODES[$i]}" = 0 ] || [ "${CODES[$i]}" = dry ] || failed=1
    json+="\"${NAMES[$i]}\": {\"exit\": \"${CODES[$i]}\", \"seconds\": ${SECONDS_TAKEN[$i]}}, "
done
echo "${json%, }}" | tee "$OUT/summary.json"
if [ "$DRY" = 1 ]; then verdict="dry run, nothing ran"; elif [ $failed = 0 ]; then verdict="all steps passed"
else verdict="SOME STEPS FAILED"; fi
echo "device_check: $verdict; logs in $OUT"
exit $failed
