#!/usr/bin/env bash
# One prepared run on a GPU machine: versions, a smoke test, the CUDA tests, then the GPU benchmark.
#
#   bash tools/gpu_check.sh            # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh --cpu      # the same steps on a machine without CUDA (checks the script itself)
#
# Needs only what the machine has (python3 with torch, triton, pytest, numpy, safetensors, tokenizers):
# nothing is installed, the package is imported from src/. Everything it writes goes to "$OUT" (default
# ./gpu-out): gpu_check.log (all output), versions.txt, smoke.log, cuda-tests-models.log/.xml,
# cuda-tests-attention.log/.xml, bench-cuda-bfloat16.md/.log, bench-cuda-float32.md/.log and summary.txt (each step's exit code and
# seconds). Each step has a time limit and a failing step does not stop the next; the whole run keeps to
# GPU_CHECK_SECONDS (default 480) by giving each step at most what is left.
#
# The GGUF tests need the pure-Python gguf package (and yaml, which it imports), which a bare GPU machine
# lacks: `make gpu-extra` copies them from .venv into gpu-extra/ (git-ignored), which this script puts on
# the path after src/ when it is there; carry gpu-extra to the machine with the working tree.
set -u -o pipefail
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=src
[ -d gpu-extra ] && export PYTHONPATH="src:gpu-extra"
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PYTHON="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_SECONDS:-480}"
START=$SECONDS
CPU_ONLY=0
[ "${1:-}" = "--cpu" ] && CPU_ONLY=1

# limit CAP: min(CAP, the seconds left minus RESERVE, kept for the steps after this one)
RESERVE=0
limit() {
    local left=$((TOTAL - (SECONDS - START) - RESERVE))
    echo $(($1 < left ? $1 : left))
}

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds and note its exit code in summary.txt
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 10 ]; then
        echo "$name: skipped, no time left" | tee -a "$OUT/summary.txt"
        return 0
    fi
    local began=$SECONDS code=0
    timeout --kill-after=10 "$limit" "$@" || code=$?
    echo "$name: exit $code after $((SECONDS - began)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    return 0
}

: > "$OUT/summary.txt"
{
    nvidia-smi || echo "no nvidia-smi"
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
EOF
} 2>&1 | tee "$OUT/versions.txt"

DEVICE=cuda
if [ "$CPU_ONLY" = 1 ]; then DEVICE=cpu; fi

# 1. smoke: one long sliding window through the library on the device, timed with its compilation
RESERVE=410
step smoke "$(limit 75)" "$PYTHON" - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/smoke.log"
import sys, time, torch
from selfattention import attention, masks
device = sys.argv[1]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
q, k, v = (torch.randn(1, 4, 4096, 64, device=device, dtype=dtype, requires_grad=device == "cuda") for _ in range(3))
rule = masks.sliding_window(256)
for attempt in ("first (compiles)", "second"):
    start = time.perf_counter()
    out = attention(q, k, v, mask=rule)
    if q.requires_grad:
        out.float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{attempt}: {time.perf_counter() - start:.2f} s")
dense = rule.materialize(1, 1, 4096, 4096, device=device)
want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense)
print("max |ours - sdpa with the dense mask| =", float((out.float() - want).abs().max()))
EOF

# 2. the CUDA tests (on a machine without CUDA they are all skipped), in two runs so that a slow first one
#    (each mask kind and dtype compiles a FlexAttention kernel) cannot keep the models' tests from running:
#    first the models, training, generation and the GPU path's own checks, then the backend matrix.
#    -o addopts= drops pytest-timeout's --timeout from pyproject.toml, since that plugin may be missing here.
PYTEST=("$PYTHON" -m pytest -m cuda -o addopts= -p no:cacheprovider -q -rfEs --maxfail=25 tests/test_cuda.py)
MATRIX="backend_values or fewer_queries"
RESERVE=250
step cuda-tests-models "$(limit 100)" "${PYTEST[@]}" -k "not ($MATRIX)" --junitxml="$OUT/cuda-tests-models.xml" \
    2>&1 | tee "$OUT/cuda-tests-models.log"
RESERVE=130
step cuda-tests-attention "$(limit 220)" "${PYTEST[@]}" -k "$MATRIX" --junitxml="$OUT/cuda-tests-attention.xml" \
    2>&1 | tee "$OUT/cuda-tests-attention.log"

# 3. the benchmark: bfloat16 first (the GPU's usual dtype), then a shorter float32 run
# (--budget-s: no case starts later than 40 s before the step's limit, so the table gets written)
if [ "$CPU_ONLY" = 1 ]; then
    RESERVE=0
    L=$(limit 150)
    step bench-cpu "$L" "$PYTHON" benchmarks/attention.py --device cpu --quick --lengths 1024 \
        --masks "sliding_window(256)" --impls sdpa "sdpa + mask" flex auto --markdown "$OUT/bench-cpu.md" \
        2>&1 | tee "$OUT/bench-cpu.log"
else
    IMPLS=(sdpa "sdpa is_causal" "sdpa + mask" flex auto blocksparse)
    RESERVE=50
    L=$(limit 160)
    step bench-cuda-bfloat16 "$L" "$PYTHON" benchmarks/attention.py --device cuda --dtype bfloat16 --heads 8 \
        --lengths 4096 16384 32768 --masks causal "sliding_window(256)" "documents(16)" --impls "${IMPLS[@]}" \
        --budget-s $((L > 45 ? L - 40 : 5)) --markdown "$OUT/bench-cuda-bfloat16.md" 2>&1 | tee "$OUT/bench-cuda-bfloat16.log"
    RESERVE=0
    L=$(limit 80)
    step bench-cuda-float32 "$L" "$PYTHON" benchmarks/attention.py --device cuda --dtype float32 --heads 8 \
        --lengths 4096 16384 --masks "sliding_window(256)" "documents(16)" --impls "${IMPLS[@]}" \
        --budget-s $((L > 45 ? L - 40 : 5)) --markdown "$OUT/bench-cuda-float32.md" 2>&1 | tee "$OUT/bench-cuda-float32.log"
fi

set +x
echo "== summary ($((SECONDS - START)) s in all) =="
cat "$OUT/summary.txt"
for table in "$OUT"/bench-*.md; do
    [ -f "$table" ] && { echo "== $table"; cat "$table"; }
done
sleep 1  # let tee write the last lines of gpu_check.log
exit 0
