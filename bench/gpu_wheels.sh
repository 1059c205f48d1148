#!/usr/bin/env bash
# Collect, on a machine that can reach the package registries, the wheels that the offline GPU
# machine lacks, into .whl/ (git-ignored), for bench/gpu_check.sh to install there.
#
#     bash bench/gpu_wheels.sh
#
# The GPU machine (Python 3.12, manylinux x86_64, no network) already has its own CUDA torch,
# transformers, accelerate, tensorboard, pytest, pillow, numpy and their dependencies
# (safetensors, tokenizers, huggingface_hub, pyyaml, tqdm, regex, packaging, psutil, filelock,
# requests). What the project needs beyond that, pinned to requirements.txt where it lists the
# package, else to the version this repository's .venv runs its CPU tests with:
#
#   deepspeed (+ einops, hjson, msgpack, ninja, py-cpuinfo, pydantic, pydantic-core,
#              annotated-types, typing-inspection, typing-extensions: pydantic needs a newer
#              one than torch may bring)
#   webdataset (+ braceexpand)
#
# Left out on purpose: `datasets` (with pyarrow ~40 MB, pandas ~12 MB, dill, xxhash,
# multiprocess, fsspec it would not fit in the 64 MiB that may travel with the repository).
# Nothing the GPU check runs needs it: data/hf.py imports `datasets` only inside the functions
# of the `data.source=hf` path, and the GPU tests train on webdataset shards.
# Never torch (or nvidia-*/triton): the GPU machine's own CUDA build must stay the one in use.
#
# deepspeed is published as an sdist only: it is built here into a pure-Python
# py3-none-any wheel with DS_BUILD_OPS=0 (no compiled ops; DeepSpeed JIT-compiles the ones a
# run needs, e.g. FusedAdam, on the GPU machine, which needs nvcc there).
#
# Prints each wheel, the size of .whl/ and of everything that travels (the repository's
# tracked and untracked-unignored files + .whl/), and fails above 64 MiB.
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$REPO/.whl
LIMIT_BYTES=$((64 * 1024 * 1024))

if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python   # has torch: deepspeed's setup.py imports it at build time
else
  PY=${PYTHON:-python3}
fi

# name -> version: requirements.txt's pin, else the version installed in $PY's environment.
PACKAGES=(
  deepspeed webdataset braceexpand
  einops hjson msgpack ninja py-cpuinfo
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
)
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

pins = {}
for line in Path("requirements.txt").read_text().splitlines():
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
    if m:
        pins[norm(m.group(1))] = m.group(2)
for name in sys.argv[1:]:
    version = pins.get(norm(name))
    if version is None:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"gpu_wheels: no version for {name}: not in requirements.txt nor installed")
    print(f"{name}=={version}")
EOF
)

rm -rf "$OUT"
mkdir -p "$OUT"

DOWNLOAD=(
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any -d "$OUT"
)
# This machine's pip config lists local indexes that lack some names; pip's warnings about
# them are noise here.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

for pin in "${PINS[@]}"; do
  case "$pin" in
    deepspeed==*)
      echo "building $pin (DS_BUILD_OPS=0, pure Python) ..."
      quiet env DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
        "$pin" -w "$OUT"
      ;;
    *)
      quiet "${DOWNLOAD[@]}" "$pin"
      ;;
  esac
done

# The deepspeed wheel must hold no compiled code (it would be built for this machine's CPU
# torch, not the GPU machine's).
ds_wheel=$(ls "$OUT"/deepspeed-*.whl)
case "$(basename "$ds_wheel")" in
  *-py3-none-any.whl) ;;
  *) echo "gpu_wheels: $ds_wheel is not a py3-none-any wheel" >&2; exit 1 ;;
esac
if "$PY" -m zipfile -l "$ds_wheel" | grep -qE '\.so(\s|$)'; then
  echo "gpu_wheels: $ds_wheel contains compiled .so files; build it with DS_BUILD_OPS=0" >&2
  exit 1
fi
if ls "$OUT" | grep -qiE '^(torch|nvidia|triton)[-_]'; then
  echo "gpu_wheels: a torch/nvidia/triton wheel slipped into $OUT; remove it" >&2
  exit 1
fi

echo
ls -l "$OUT" | awk 'NR > 1 {printf "  %9d  %s\n", $5, $9}'
whl_bytes=$(du -sb "$OUT" | cut -f1)
repo_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
  | awk '/\ttotal$/ {s += $1} END {print s + 0}')
total=$((whl_bytes + repo_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo ".whl/: $(ls "$OUT"/*.whl | wc -l) wheels, $(mib "$whl_bytes")"
echo "repository files that travel: $(mib "$repo_bytes"); with .whl/: $(mib "$total") of 64 MiB"
if (( total > LIMIT_BYTES )); then
  echo "gpu_wheels: $(mib "$total") is over the 64 MiB that may travel" >&2
  exit 1
fi
