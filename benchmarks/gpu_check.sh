#!/usr/bin/env bash
# Everything the fused LoRA kernels need checked on a real GPU, as ONE command that fits in a 10-minute
# limit (8.5 minutes at most: every part runs under its own `timeout`):
#
#     bash benchmarks/gpu_check.sh           # environment, GPU tests, bf16/TF32/autocast tests, benchmark
#     bash benchmarks/gpu_check.sh rest      # the other kernel tests (float32/16/64, small shapes)
#     bash benchmarks/gpu_check.sh bench     # only the benchmark, with more time
#
# Output goes to the terminal and to $OUT/gpu_check.log when OUT is set (a temporary folder if not),
# with the benchmark's Markdown summary in $OUT/bench_lora_linear.md (written after every shape, so a
# run cut short keeps its rows) and the tests' JUnit reports next to it. Exit status: 0 when every
# part passed.
#
# No installation needed: minilora is made importable through a temporary folder on PYTHONPATH that
# holds a folder `minilora` linking the package's files, with kernels/ linked inside it as
# minilora/kernels. The repository root itself never goes on sys.path: its top-level kernels/ would
# shadow the PyPI package `kernels` that transformers probes for (see README.md). Triton's compile
# cache (~/.triton/cache) carries over between calls on the same machine.
set -u -o pipefail
cd "$(dirname "$0")/.."
repo=$PWD
mode=${1:-main}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
PY=$(command -v python || command -v python3)

pkg=$(mktemp -d)
mkdir "$pkg/minilora"
for f in "$repo"/minilora/*; do
    [ "$(basename "$f")" = __pycache__ ] || ln -s "$f" "$pkg/minilora/"
done
ln -s "$repo/kernels" "$pkg/minilora/kernels"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"

# pytest, not `python -m pytest`, which would put the repository root on sys.path
if command -v pytest >/dev/null; then
    PYTEST=(pytest)
else
    PYTEST=("$PY" -P -m pytest)  # -P (Python >= 3.11): no current directory on sys.path either
fi

ENV_CHECK='
import importlib.util, sys
import torch, triton
import minilora, minilora.kernels
print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda,
      "| triton", triton.__version__)
for name in ("peft", "transformers", "pytest"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "NOT INSTALLED")
print("minilora:", minilora.__file__, "| minilora.kernels:", minilora.kernels.__file__)
spec = importlib.util.find_spec("kernels")
print("top-level `kernels`:", spec.origin if spec else None, "(must not be this repository)")
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("GPU:", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
'

failed=()
part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, report exit status and time
    local name=$1 limit=$2 t0=$SECONDS rc cmd
    shift 2
    cmd="$*"
    cmd=${cmd//$'\n'/ }
    echo
    echo "==== $name (limit ${limit}s, $(date -u +%H:%M:%S) UTC): ${cmd:0:160}"
    timeout -k 5 "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "==== $name: TIMED OUT after ${limit}s"
    echo "==== $name: exit $rc after $((SECONDS - t0))s"
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
    return $rc
}

main() {
    echo "gpu_check.sh $mode: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi -L || echo "nvidia-smi: not available"
    (cd "$pkg" && part environment 30 "$PY" -c "$ENV_CHECK") || failed+=("environment")  # not from the repo
    local tests=tests/test_kernels.py first="bfloat16 or tf32 or autocast or checkpointing"
    case $mode in
        main)
            part "GPU tests" 170 "${PYTEST[@]}" -v -m gpu $tests --durations=10 --junitxml="$out/gpu_tests.xml"
            part "bf16, TF32, autocast, checkpoint tests" 90 "${PYTEST[@]}" -q -m "not gpu" $tests \
                -k "$first" --durations=5 --junitxml="$out/bf16_tests.xml"
            part benchmark 200 env TRITON_PRINT_AUTOTUNING=1 \
                "$PY" benchmarks/bench_lora_linear.py --markdown "$out/bench_lora_linear.md"
            ;;
        rest)
            part "other kernel tests" 540 "${PYTEST[@]}" -q -m "not gpu" -k "not ($first)" $tests \
                --durations=10 --junitxml="$out/other_tests.xml"
            ;;
        bench)
            part benchmark 540 env TRITON_PRINT_AUTOTUNING=1 \
                "$PY" benchmarks/bench_lora_linear.py --markdown "$out/bench_lora_linear.md"
            ;;
        *)
            echo "unknown mode $mode: main, rest or bench"
            return 2
            ;;
    esac
    echo
    if [ ${#failed[@]} -eq 0 ]; then
        echo "gpu_check.sh $mode: all parts passed in ${SECONDS}s"
    else
        local IFS=";"
        echo "gpu_check.sh $mode: FAILED: ${failed[*]} (${SECONDS}s)"
        return 1
    fi
}

main 2>&1 | tee "$out/gpu_check.log"
