#!/usr/bin/env bash
# The GPU check: everything a first call on a GPU machine must prove, in one command that
# installs nothing from the network. Rehearse it on the CPU first (small sizes, minutes):
#
#   DEVICE=cpu bash benchmarks/gpu_check.sh          # or: make gpu-check DEVICE=cpu
#   bash benchmarks/gpu_check.sh                     # on the GPU machine (DEVICE=cuda)
#
# Steps (each one's exit code is recorded; the script goes on after a failure and exits 1 if
# any step failed): the environment; the CUDA-marked tests (tests/test_cuda.py) on DEVICE;
# `python -m benchmarks throughput` for encoder=cnn at Fashion-MNIST shapes and encoder=resnet18
# at CIFAR shapes (synthetic uint8 images when no CIFAR-10 files are present), compile off and
# on; one real `contrast train` (Fashion-MNIST on cuda, digits on cpu) with
# trainer.deterministic=true, then `contrast reproduce` of it.
#
# Settings (environment):
#   DEVICE         cuda (default) or cpu
#   OUT            results folder (default benchmarks/results/gpu_check). It receives at most
#                  five files: summary.md, summary.json, check.log, gpu_check.tgz (benchmark
#                  JSON/tables, run directories without checkpoints, test log) and env.txt.
#   WHEELS         folder of wheels installed offline first, --no-deps (default .whl if it
#                  holds any): hydra-core, omegaconf, antlr4-python3-runtime, pydantic, ...
#   CONTRAST_DATA  data root; Fashion-MNIST's four .gz files in $CONTRAST_DATA/FashionMNIST/raw
#                  (default .data if that folder exists)
#   PYTHON         the interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$REPO/benchmarks/results/gpu_check}
WHEELS=${WHEELS:-$REPO/.whl}
PY=${PYTHON:-python3}
case "$DEVICE" in cuda|cpu) ;; *) echo "DEVICE=$DEVICE is not allowed; allowed: cuda, cpu" >&2; exit 2 ;; esac

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bench" "$WORK/runs"
exec > >(tee "$OUT/check.log") 2>&1
STEPS="$WORK/steps.tsv"
: >"$STEPS"

step() {  # step NAME COMMAND...: run it, print its time and exit code, record both
    local name=$1 start rc
    shift
    echo
    echo "=== $name: $*"
    start=$(date +%s)
    "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
    echo "=== $name: exit $rc in $(($(date +%s) - start)) s"
    return 0
}

# --------------------------------------------------------------------------- setup
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CONTRAST_DATA:-}" ] && [ -d "$REPO/.data" ]; then
    export CONTRAST_DATA="$REPO/.data"
fi
missing() {
    "$PY" - <<'EOF'
import importlib.util
names = ["torch", "torchvision", "hydra", "omegaconf", "pydantic", "numpy", "safetensors",
         "sklearn", "matplotlib", "tqdm", "PIL", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
}
if [ -n "$(missing)" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing $(missing) from $WHEELS (offline, --no-deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "$WHEELS"/*.whl || { echo "installing $WHEELS/*.whl failed"; exit 1; }
    export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH#"$REPO"}"
fi
if [ -n "$(missing)" ]; then
    echo "missing Python packages: $(missing); carry their wheels in $WHEELS (bash benchmarks/gpu_wheels.sh)"
    exit 1
fi

if [ "$DEVICE" = cuda ]; then
    DATA=fashion_mnist
    RUN_SIZE=("trainer.epochs=3")
    BENCH_SIZE=(--repeats 3 --steps 30 --workers 8)
    LOSSES=ntxent,moco,byol
    COMPILE_ENCODERS="cnn resnet18"
else  # the rehearsal: the same commands at sizes that take seconds
    DATA=digits
    RUN_SIZE=("trainer.epochs=2" "trainer.batch_size=64" "eval.probe.max_iter=30"
        "eval.monitor_bank=500" "eval.monitor_queries=100" "eval.embedding_points=200")
    BENCH_SIZE=(--quick --repeats 1 --steps 2 --workers 1 --override trainer.batch_size=16)
    LOSSES=ntxent
    COMPILE_ENCODERS=${COMPILE_ENCODERS-cnn}
fi

environment() {
    "$PY" -m contrastive_cli --version 2>/dev/null || true
    "$PY" - <<'EOF'
import platform, torch, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
print(f"cuda available: {torch.cuda.is_available()}, torch cuda {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi || true
}
step environment environment
cp "$OUT/check.log" "$OUT/env.txt"

# --------------------------------------------------------------------------- tests
step tests env CONTRAST_CHECK_DEVICE="$DEVICE" \
    "$PY" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider -rs ${TESTS_K:+-k "$TESTS_K"}

# --------------------------------------------------------------------------- throughput
throughput() {  # throughput ENCODER COMPILE(on|off)
    local encoder=$1 compile=$2 args=()
    [ "$compile" = on ] && args+=(--compile)
    if [ "$encoder" = resnet18 ]; then
        # CIFAR-10 shapes: the real files when present, else synthetic uint8 images
        local cifar=synthetic
        [ -d "${CONTRAST_DATA:-data}/cifar-10-batches-py" ] && cifar=auto
        args+=(--data "$cifar" --override data=cifar10 --override data.download=false
            --override encoder=resnet18)
    else
        args+=(--data auto --override data.download=false)
    fi
    "$PY" -m benchmarks throughput --device "$DEVICE" --losses "$LOSSES" "${BENCH_SIZE[@]}" \
        --out "$WORK/bench/throughput_${encoder}_compile_$compile" "${args[@]}"
}
for encoder in cnn resnet18; do
    step "throughput_${encoder}_compile_off" throughput "$encoder" off
    case " $COMPILE_ENCODERS " in *" $encoder "*)
        step "throughput_${encoder}_compile_on" throughput "$encoder" on ;;
    esac
done

# --------------------------------------------------------------------------- a real run
TRAIN="$WORK/runs/train"
step train "$PY" -m contrastive_cli train "data=$DATA" data.download=false "device=$DEVICE" \
    trainer.deterministic=true "${RUN_SIZE[@]}" "hydra.run.dir=$TRAIN"
step reproduce "$PY" -m contrastive_cli reproduce "$TRAIN" --out "$WORK/runs/reproduce"

# --------------------------------------------------------------------------- results
step summary "$PY" -m benchmarks.gpu_summary "$WORK" "$STEPS" "$OUT" "$DEVICE"
tar -czf "$OUT/gpu_check.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.safetensors' bench runs
failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STEPS" | tr '\n' ' ')
if [ -n "$failed" ]; then
    echo "FAILED steps: $failed(see $OUT/check.log)"
    exit 1
fi
echo "all steps passed; results in $OUT"
