#!/usr/bin/env bash
# The GPU check, one command, no network, at most ~8 minutes on one GPU (docs/gpu_check.md):
#
#     bash bench/gpu_check.sh
#
# 1. Without a CUDA device (or without python3/torch) it prints one line and exits 0.
# 2. Installs the wheels in .whl/ (made by bench/gpu_wheels.sh on a machine with the package
#    registries: deepspeed, webdataset, ...) into a temporary --target directory put first on
#    PYTHONPATH, its bin/ (ninja) first on PATH. Never torch: the machine's own CUDA build stays.
# 3. Preflight: versions, GPUs, that everything the tests import is importable, and which
#    Adam the trainer picks on CUDA (torch's fused AdamW unless DeepSpeed's FusedAdam is
#    prebuilt: no nvcc needed).
# 4. python3 -m pytest -q tests/gpu: real training runs on the GPU(s). With several GPUs
#    every training run uses all of them (torchrun --nproc_per_node = GPU count): set
#    GPU_CHECK_NPROC=1 to use one.
# 5. python3 -m bench.gpu_bench: ViT-B/32 throughput, MFU, step split, memory vs the planner,
#    and one rank's share of the paper's two runs under a 40 GiB cap (cuda:0).
#
# Prints one summary table; exits 1 if any stage failed or timed out. Stage time limits (s),
# overridable: GPU_CHECK_INSTALL_S (45), GPU_CHECK_PREFLIGHT_S (60), GPU_CHECK_PYTEST_S
# (240), GPU_CHECK_BENCH_S (130): 475 s in all.
set -euo pipefail
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v "$PY" >/dev/null 2>&1 \
  || ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device here; nothing to check"
  exit 0
fi

INSTALL_S=${GPU_CHECK_INSTALL_S:-45}
PREFLIGHT_S=${GPU_CHECK_PREFLIGHT_S:-60}
PYTEST_S=${GPU_CHECK_PYTEST_S:-240}
BENCH_S=${GPU_CHECK_BENCH_S:-130}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -p no:cacheprovider"
if [[ -z "${GPU_CHECK_NPROC:-}" ]]; then
  GPU_CHECK_NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
fi
export GPU_CHECK_NPROC
# A run that hangs is stopped (and reported) by the tests before the stage limit ends pytest.
export GPU_CHECK_JOB_TIMEOUT=${GPU_CHECK_JOB_TIMEOUT:-$((PYTEST_S - 60))}

STAGES=()   # "name|status|seconds|detail"
FAILED=0

# run_stage NAME LIMIT_S CMD...: runs CMD under `timeout`, output to the terminal and to
# $TMP/NAME.log; records ok / FAIL (rc) / TIMEOUT and the last summary-like line.
run_stage() {
  local name=$1 limit=$2
  shift 2
  echo "== gpu_check: $name (limit ${limit} s)"
  local start=$SECONDS rc=0
  set +e
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$TMP/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status=TIMEOUT
  elif ((rc != 0)); then
    status="FAIL ($rc)"
  fi
  [[ $status == ok ]] || FAILED=1
  local detail
  detail=$(grep -E " (passed|failed|skipped|error)|runs ok|gpu_check:|gpu_bench: no" \
    "$TMP/$name.log" | tail -1 || true)
  [[ -n $detail ]] || detail=$(grep -v '^[[:space:]]*$' "$TMP/$name.log" | tail -1 || true)
  detail=${detail//|/\/}
  STAGES+=("$name|$status|$((SECONDS - start))|${detail:0:90}")
}

skip_stage() {
  STAGES+=("$1|skipped|0|$2")
}

if compgen -G ".whl/*.whl" >/dev/null; then
  WHEELS=()
  for w in .whl/*.whl; do
    case "$(basename "$w")" in
      torch-* | torchvision-* | triton-* | nvidia_* | nvidia-*)
        echo "gpu_check: not installing $(basename "$w"): the machine's own build stays" ;;
      *) WHEELS+=("$w") ;;
    esac
  done
  export GPU_CHECK_WHEELS=${#WHEELS[@]}
  run_stage install "$INSTALL_S" bash -c '"$0" "$@" && echo "gpu_check: installed \
$GPU_CHECK_WHEELS wheels from .whl/ into a temporary --target directory"' \
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$TMP/site" "${WHEELS[@]}"
  export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$TMP/site/bin:$PATH"
else
  skip_stage install "no .whl/ (bash bench/gpu_wheels.sh makes it); using what is installed"
fi

run_stage preflight "$PREFLIGHT_S" "$PY" - <<'EOF'
import importlib, os, shutil, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
missing = []
for name in ("deepspeed", "transformers", "accelerate", "webdataset", "braceexpand", "PIL",
             "numpy", "yaml", "safetensors", "tokenizers", "tensorboard", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')}")
    except Exception as err:
        missing.append(name)
        print(f"  {name}: NOT importable ({type(err).__name__}: {err})")
from torch.utils.cpp_extension import CUDA_HOME
print(f"  nvcc: {shutil.which('nvcc') or 'not on PATH'}; CUDA_HOME: {CUDA_HOME}; "
      f"ninja: {shutil.which('ninja') or 'not on PATH'}; "
      f"c++: {shutil.which('c++') or shutil.which('g++') or 'not on PATH'}")
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)}: run bash bench/gpu_wheels.sh and carry .whl/")
from trainer.engine import DEEPSPEED_FUSED_ADAM, choose_optimizer
choice = choose_optimizer(on_cuda=True)
print(f"gpu_check: the trainer's optimizer here: {choice}")
if choice == DEEPSPEED_FUSED_ADAM:
    from deepspeed.ops.op_builder import FusedAdamBuilder
    FusedAdamBuilder().load()  # prebuilt: imports it
EOF

run_stage pytest "$PYTEST_S" "$PY" -m pytest -q -rs tests/gpu
run_stage bench "$BENCH_S" "$PY" -m bench.gpu_bench

echo
echo "gpu_check summary ($GPU_CHECK_NPROC GPU(s) per training run)"
printf '%-10s %-10s %6s  %s\n' stage status seconds detail
printf '%-10s %-10s %6s  %s\n' ---------- ---------- ------ ------
for row in "${STAGES[@]}"; do
  IFS='|' read -r name status seconds detail <<<"$row"
  printf '%-10s %-10s %6s  %s\n' "$name" "$status" "$seconds" "$detail"
done
if ((FAILED)); then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: all stages passed"
