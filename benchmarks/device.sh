#!/usr/bin/env bash
# cnnjax on the GPU machine, in one go (under 10 minutes on an H200): install, test, benchmark.
#
#   bash benchmarks/device.sh [OUT_DIR]            # on the GPU machine, from the repository root
#   bash benchmarks/device.sh --smoke [OUT_DIR]    # anywhere (the CPU too): tiny sizes, no install
#   bash benchmarks/device.sh --fetch-wheels       # on a machine with network access: fills .whl/
#
# OUT_DIR defaults to $OUT, else checkpoints/device; a relative one is taken from the repository
# root. Installed packages and prepared data go to a fresh directory from `mktemp -d` (under
# $TMPDIR), removed at the end.
#
# The GPU machine has no network and JAX 0.11 (CUDA 13), flax, optax, orbax and torch 2.11, but
# not tensorflow-datasets, array_record or mlxtend: those travel as wheels in .whl/ in the
# repository (from --fetch-wheels), are installed into that temporary directory, and cnnjax
# itself is installed with --no-deps so pip never replaces the machine's JAX.
# Then: the GPU-relevant tests (conv lowerings, torch parity, steps), then
# benchmarks/device_bench.py (train and eval at batch 128-8192, f32 and bf16, lax.scan over
# device-resident batches, against torch eager channels-last; 8 vmapped seeds against 8
# sequential), which writes OUT_DIR/device.json and OUT_DIR/device.md. A failing test is
# reported in the table and does not stop the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the machine lacks for cnnjax: tensorflow-datasets, array_record, mlxtend and those of their
# needs that are not in its image (the versions cnnjax is tested with). One version each (two
# stop the install). promise is published only as source: --fetch-wheels builds its (pure-Python)
# wheel.
WHEELS="tensorflow-datasets==4.9.10 array-record==0.8.6 mlxtend==0.25.0 toml==0.10.2
termcolor==3.3.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 simple-parsing==0.1.9
docstring-parser==0.18.0 promise==2.3 immutabledict==4.3.1 dm-tree==0.1.10"

mode=run
case "${1:-}" in
  --smoke) mode=smoke; shift ;;
  --fetch-wheels) mode=fetch; shift ;;
esac
out="${1:-${OUT:-checkpoints/device}}"

if [ "$mode" = fetch ]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w" 2>/dev/null \
      || python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$w" \
      || echo "could not fetch $w" >&2
  done
  du -sh .whl
  exit 0
fi

mkdir -p "$out"
start=$(date +%s)
scratch="$(mktemp -d -t cnnjax-device.XXXXXX)" || { echo "mktemp -d failed" >&2; exit 1; }
trap 'rm -rf "$scratch"' EXIT
export CNNJAX_DATA_DIR="${CNNJAX_DATA_DIR:-$scratch/tfds}"
export PYTHONUNBUFFERED=1
# JAX and torch share the GPU: JAX takes half of its memory instead of 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"

if [ "$mode" = run ]; then
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$scratch/site" .whl/*.whl \
      || { echo "installing the wheels of .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "installing cnnjax failed" >&2; exit 1; }
fi
python3 -c "import jax, flax, optax, torch, cnnjax; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)" \
  2>&1 | tee "$out/versions.txt"

tests="tests/test_winograd.py tests/test_conv.py tests/test_torch_parity.py tests/test_steps.py"
if [ "$mode" = smoke ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_winograd.py -k "bad or per_layer" \
    2>&1 | tee "$out/tests.log"
  timeout 300 python3 benchmarks/device_bench.py --smoke --out "$out" --tests-log "$out/tests.log"
else
  timeout 210 python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tee "$out/tests.log"
  timeout 330 python3 benchmarks/device_bench.py --out "$out" --tests-log "$out/tests.log"
fi
status=$?
echo "device.sh: $(( $(date +%s) - start )) s, results in $out (exit $status)"
exit $status
