#!/usr/bin/env bash
# robustkern's GPU validation and benchmarks on a machine with one CUDA GPU, in one command:
#
#   bash benchmarks/gpu_suite.sh OUT                     # build, GPU tests, every benchmark at its GPU sizes
#   bash benchmarks/gpu_suite.sh --dry-run OUT           # the same steps at tiny sizes on the CPU (checks the suite)
#   bash benchmarks/gpu_suite.sh --list                  # the steps with their time limits and commands
#   bash benchmarks/gpu_suite.sh --steps ibp,attacks OUT # some steps only (the build check always runs)
#   bash benchmarks/gpu_suite.sh --merge OUT             # put OUT's RESULTS.md blocks and CSV rows into benchmarks/
#
# Options: --budget SECONDS (start no step once the time is spent: each step's limit is cut to what is left),
# --archive FILE (after every step, pack OUT into FILE, a .tar.gz), --lirpa-path DIR (auto_LiRPA for the
# comparison rows of bench_ibp.py, bench_crown.py and bench_alpha_crown.py), --commit ID (recorded with the
# figures where the sources are not a git checkout), --python PY (default: the first of python3, python that imports torch). Packages on
# PYTHONPATH (torchattacks, ...) stay on it.
#
# The steps run in order of value, so that a run cut short has the most useful results: the build (pip install
# --no-build-isolation -e ., skipped when the extension in place was built from the same sources:
# build/gpu_suite.stamp), the GPU tests (pytest -m gpu and the CUDA selections of the op tests), then the
# benchmarks of bound propagation, randomized smoothing, attacks, flatness, the published projects' own steps, the
# op floor's per-call cost and the install times at the sizes benchmarks/README.md documents. Each step runs under
# `timeout` with its own limit, a failing step does not stop the others, and after every step OUT holds: summary.txt
# (step, status, seconds, limit, log), logs/NN-step.log (and the pytest junit XML), RESULTS.md (the blocks of this
# run's benchmarks, each with device, date, commit and command) and results/<bench>.csv. Exit status 0 when every
# step passed or was skipped because its script lacks an option the step gives it, 1 otherwise.
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"

# ------------------------------------------------------------------------------------------------ the steps
# step | limit s | command on the GPU | command in a dry run (CPU, tiny sizes)
# "@fn args" runs the function fn of this script; "script.py args" runs benchmarks/script.py. A benchmark step
# is skipped when its script has no option that the step passes (a grep of its add_argument calls).
read -r -d '' STEPS <<'EOF'
env                  |  60 | @env_info | @env_info
build                | 900 | @build | @build
# ---- tests: the op tests' CUDA cases, then everything marked gpu
test-build           | 120 | @run_pytest tests/test_build.py | @run_pytest tests/test_build.py
test-cuda-ops        | 300 | @run_pytest tests/test_interval_cpp.py -k "cuda or mixed_devices" | @run_pytest tests/test_interval_cpp.py -k "cpu and float32 and sound and wide"
test-triton          | 300 | @run_pytest_parallel tests/test_interval_triton.py | @run_pytest_parallel tests/test_interval_triton.py -k "input_box"
test-gpu             | 600 | @run_pytest -m gpu tests | @run_pytest -m gpu tests
# cuDNN free to choose Winograd/FFT algorithms: the sound bounds must hold under any of them
test-cudnn-benchmark | 150 | @run_pytest_cudnn_benchmark tests/test_interval_cpp.py -k "cuda and (sound or precision)" | @run_pytest_cudnn_benchmark tests/test_interval_cpp.py -k "cpu and sound and point"
# ---- bound propagation
soundness            | 240 | gpu_soundness.py --batch 32 --write-results | gpu_soundness.py --batch 2 --op-batch 1 --models cifar_medium:padding=1 --eps 2/255 --points 2 --write-results
ibp                  | 360 | bench_ibp.py --device cuda --models cnn_7layer_bn,cifar_medium:padding=1 --batch 256,64 --eps 2/255 --providers plain,eager,robustkern,robustkern-unsound,auto_lirpa --write-results | bench_ibp.py --device cpu --threads 1 --quick --models cifar_medium:padding=1 --providers plain,eager,robustkern,robustkern-unsound,auto_lirpa --write-results
crown-cnn7           | 300 | bench_crown.py --device cuda --models cnn_7layer_bn --batch 256 --write-results | bench_crown.py --device cpu --models cnn_7layer_bn --batch 2 --rounds 1 --write-results
crown-medium         | 240 | bench_crown.py --device cuda --models cifar_medium:padding=1 --batch 64 --write-results | bench_crown.py --device cpu --models cifar_medium:padding=1 --batch 3 --rounds 1 --write-results
sound                | 300 | bench_sound.py --device cuda --batch 32 --models mlp_small,cnn_small,digits_cnn,cifar_medium,cnn_7layer_bn --write-results | bench_sound.py --device cpu --models mlp_small --batch 4 --rounds 1 --write-results
alpha-crown          | 300 | bench_alpha_crown.py --device cuda --batch 256 --write-results | bench_alpha_crown.py --device cpu --threads 1 --models mlp --batch 2 --iterations 3 --rounds 1 --write-results
lipschitz            | 300 | bench_lipschitz.py --device cuda --write-results | bench_lipschitz.py --device cpu --threads 1 --quick --write-results
# ---- randomized smoothing (bench_smoothing.py and bench_smoothing_train.py take the GPU when there is one)
smoothing            | 540 | bench_smoothing.py --models cifar_small,resnet110 --n 100000,100000 --images 1 --write-results | bench_smoothing.py --models cifar_small --n 200 --n0 10 --images 1 --batch 100 --threads 1 --rounds 1 --no-compiled --write-results
smoothing-train      | 300 | bench_smoothing_train.py --models cifar_small,resnet110 --batch 64,64 --write-results | bench_smoothing_train.py --models cifar_small --batch 2 --rounds 1 --smoothadv-steps 1 --trades-steps 1 --write-results
macer-tail           | 120 | bench_macer_tail.py --device cuda --write-results | bench_macer_tail.py --device cpu --rounds 10 --repeats 1 --write-results
# ---- attacks
attacks              | 240 | bench_attacks.py --device cuda --models mnist_small,preact_resnet18 --batch 256,128 --steps 20,100 --write-results | bench_attacks.py --device cpu --threads 1 --quick --write-results
# ---- flatness
flatness             | 300 | bench_flatness.py --device cuda --models small_cnn,small_cnn_avg,preact_resnet18 --batch 128,128,128 --write-results | bench_flatness.py --device cpu --threads 1 --quick --models small_cnn,small_cnn_avg --write-results
flatness-fused       | 180 | bench_flatness_fused.py --device cuda --models mnist_small,mnist_large --batch 128 --lfr --write-results | bench_flatness_fused.py --device cpu --models mnist_small --batch 8 --rounds 1 --write-results
# ---- the published projects' own steps, their call path against robustkern.compat, at their configs' sizes
clients              | 600 | bench_clients.py --device cuda --trades-batch 256 --certify-n 100000 --write-results | bench_clients.py --device cpu --small --rounds 1 --lfr-steps 2 --certify-n 200 --write-results
clients-lirpa        | 300 | bench_clients_lirpa.py --device cuda --write-results | bench_clients_lirpa.py --device cpu --models mlp_3layer,resnet --batch 2 --rounds 1 --short-rounds 1 --write-results
# ---- what the op floor adds per call, on this machine's CPU
dispatch             | 120 | bench_dispatch.py --write-results | bench_dispatch.py --rounds 2 --calls 50 --write-results
# ---- installing robustkern on this machine: the build with pip, a re-install, the JIT build's first use
build-times          | 600 | bench_build.py --write-results | bench_build.py --steps jit --write-results
EOF

# ------------------------------------------------------------------------------------------------ helpers
log() { printf '[gpu_suite %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; printf '%s' "${s%"${s##*[![:space:]]}"}"; }
usage() { sed -n '2,26p' "$SELF" | sed 's/^# \{0,1\}//'; }

pick_python() {
  local p
  for p in python3 python; do
    command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null && { echo "$p"; return; }
  done
  echo python3
}

step_rows() { # step <TAB> limit <TAB> command (GPU, or the dry-run one with DRY=1)
  local line f
  while IFS= read -r line; do
    [[ -z "$(trim "$line")" || "$(trim "$line")" == \#* ]] && continue
    IFS='|' read -r -a f <<<"$line"
    printf '%s\t%s\t%s\n' "$(trim "${f[0]}")" "$(trim "${f[1]}")" "$(trim "${f[$([ "$DRY" = 1 ] && echo 3 || echo 2)]}")"
  done <<<"$STEPS"
}

# ------------------------------------------------------------------------------------------------ step functions
env_info() {
  date -u; uname -srm; echo "cores: $(nproc)"; free -g 2>/dev/null | head -2
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  else echo "nvidia-smi: absent"; fi
  if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -2; else echo "nvcc: absent"; fi
  "$PY" - <<'PYEOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}; "
          f"cudnn {torch.backends.cudnn.version()}")
for m in ("triton", "numpy", "scipy", "pytest", "xdist", "torchattacks", "auto_LiRPA"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} ({getattr(mod, '__file__', '?')})")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: not importable ({type(e).__name__})")
PYEOF
}

build_stamp() { # what the extension must have been built from: the C++/CUDA sources, setup.py and its flags
               # (robustkern/_build_spec.py), torch, python
  "$PY" - <<'PYEOF'
import hashlib, pathlib, sys, torch
h = hashlib.sha256()
for p in sorted(pathlib.Path("csrc").rglob("*")) + [pathlib.Path("setup.py"), pathlib.Path("robustkern/_build_spec.py")]:
    if p.is_file():
        h.update(str(p).encode()); h.update(p.read_bytes())
h.update(f"{torch.__version__} {torch.version.cuda} {sys.version_info[:2]}".encode())
print(h.hexdigest()[:16])
PYEOF
}

extension_loads() { # the built robustkern._C loads (no compiling on first use), with CUDA kernels on a GPU run
  "$PY" - "$([ "$DRY" = 1 ] && echo 0 || echo 1)" <<'PYEOF'
import sys
import torch
from robustkern import _ext
ok = _ext.load() and _ext.status() == "prebuilt"
if ok and sys.argv[1] == "1":
    ok = _ext.has_cuda_kernels()
print(f"robustkern._C: {'loads' if ok else 'NOT usable'} ({torch.ops.robustkern.build_info() if ok else _ext.status()})")
sys.exit(0 if ok else 1)
PYEOF
}

build() {
  local stamp command=("$PY" -m pip install --no-build-isolation -e .)
  stamp="$(build_stamp)"
  if [ "$(cat build/gpu_suite.stamp 2>/dev/null)" = "$stamp" ] && extension_loads; then
    log "the extension in place was built from these sources (build/gpu_suite.stamp $stamp): not rebuilt"
    return 0
  fi
  if [ "$DRY" = 1 ]; then  # a dry run checks the CPU build in place and installs nothing
    log "dry run: would run: MAX_JOBS=$(nproc) ${command[*]}"
    extension_loads
    return
  fi
  log "building: MAX_JOBS=$(nproc) ${command[*]}"
  MAX_JOBS="$(nproc)" "${command[@]}" || return 1
  extension_loads || return 1
  mkdir -p build && echo "$stamp" >build/gpu_suite.stamp
}

run_pytest() {
  local junit=()
  [ -n "${STEP_JUNIT:-}" ] && junit=(--junitxml="$STEP_JUNIT")
  "$PY" -m pytest -q -p no:cacheprovider -rfEs "${junit[@]}" "$@"
}

run_pytest_parallel() { # pytest-xdist when installed: Triton compiles its kernels in parallel
  if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then run_pytest -n 8 "$@"; else run_pytest "$@"; fi
}

run_pytest_cudnn_benchmark() {
  local junit=()
  [ -n "${STEP_JUNIT:-}" ] && junit=(--junitxml="$STEP_JUNIT")
  "$PY" -c 'import sys, torch, pytest
torch.backends.cudnn.benchmark = True
print("torch.backends.cudnn.benchmark =", torch.backends.cudnn.benchmark, flush=True)
sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider -rfEs "${junit[@]}" "$@"
}

missing_option() { # the first --option of a benchmark command that its script does not define
  local script="benchmarks/$1" w; shift
  for w in "$@"; do
    [[ "$w" == --* ]] || continue
    grep -q -- "\"${w%%=*}\"" "$script" || { echo "${w%%=*}"; return; }
  done
}

accepts() { grep -q -- "\"$2\"" "benchmarks/$1"; }  # script $1 defines option $2

# ------------------------------------------------------------------------------------------------ the run
record() { # step status wall limit note: one summary line, then the archive
  printf '%-22s %-9s %6s %6s  %s\n' "$1" "$2" "$3" "$4" "$5" >>"$OUT/summary.txt"
  if [ -n "$ARCHIVE" ]; then
    tar -czf "$ARCHIVE.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv -f "$ARCHIVE.part" "$ARCHIVE"
  fi
}

run_suite() {
  local t0=$SECONDS n=0 failed=0 step limit cmd status rc started wall left note
  mkdir -p "$OUT/logs"
  printf '%-22s %-9s %6s %6s  %s\n' step status wall_s limit_s note >"$OUT/summary.txt"
  log "$([ "$DRY" = 1 ] && echo 'DRY RUN on the CPU, tiny sizes' || echo 'GPU run'); results in $OUT"
  if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: run the suite on a machine with one, or check it here with --dry-run"; return 2
  fi
  while IFS=$'\t' read -r step limit cmd; do
    n=$((n + 1))
    if [ -n "$ONLY" ] && [ "$step" != env ] && [ "$step" != build ] && [[ ",$ONLY," != *",$step,"* ]]; then
      continue
    fi
    note=""
    local logf full
    logf="$(printf '%02d-%s' "$n" "$step")"
    export STEP_JUNIT=""
    [[ "$cmd" == @run_pytest* ]] && STEP_JUNIT="$OUT/logs/$logf.xml"
    if [[ "$cmd" == @* ]]; then
      full="${cmd#@}"
    else
      local words miss; read -r -a words <<<"$cmd"
      miss="$(missing_option "${words[@]}")"
      if [ -n "$miss" ]; then
        record "$step" skip 0 "$limit" "${words[0]} has no $miss option"; log "step $step: skipped (${words[0]} has no $miss)"
        continue
      fi
      [ -n "$LIRPA" ] && accepts "${words[0]}" --lirpa-path && cmd+=" --lirpa-path $(printf %q "$LIRPA")"
      [ -n "$COMMIT" ] && cmd+=" --commit $(printf %q "$COMMIT")"
      full="\"\$PY\" benchmarks/$cmd --results-dir $(printf %q "$OUT")"
    fi
    if [ -n "$BUDGET" ]; then
      left=$((BUDGET - (SECONDS - t0) - 10))
      if [ "$left" -lt 20 ]; then
        record "$step" NOT-RUN 0 "$limit" "the --budget was spent"; log "step $step: not run (budget spent)"; failed=1
        continue
      fi
      [ "$limit" -gt "$left" ] && { limit=$left; note="limit cut to the budget; "; }
    fi
    log "step $step (limit ${limit} s): ${full//\"\$PY\"/$PY}"
    echo "# $step: ${full//\"\$PY\"/$PY}" >"$OUT/logs/$logf.log"
    started=$SECONDS
    timeout -k 15 "$limit" bash "$SELF" __exec "$full" >>"$OUT/logs/$logf.log" 2>&1 </dev/null
    rc=$?
    wall=$((SECONDS - started))
    case $rc in
      0) status=ok ;;
      124|137) status=TIMEOUT; failed=1 ;;
      *) status="FAIL($rc)"; failed=1 ;;
    esac
    record "$step" "$status" "$wall" "$limit" "${note}logs/$logf.log"
    log "step $step: $status in ${wall} s"
    [ "$status" = ok ] || tail -n 15 "$OUT/logs/$logf.log" | sed 's/^/    | /'
  done < <(step_rows)
  log "done in $((SECONDS - t0)) s"
  echo; cat "$OUT/summary.txt"
  return $failed
}

# ------------------------------------------------------------------------------------------------ main
cd "$ROOT" || exit 2
if [ "${1:-}" = __exec ]; then eval "$2"; exit; fi         # one step, under timeout (internal)
DRY=0 ONLY="" BUDGET="" ARCHIVE="" LIRPA="" COMMIT="" PY="" MERGE=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --list) DRY=0; printf '%-22s %6s  %s\n' step limit_s command; step_rows | while IFS=$'\t' read -r s l c; do
              printf '%-22s %6s  %s\n' "$s" "$l" "$c"; done; exit 0 ;;
    --merge) MERGE=1 ;;
    --steps) ONLY="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --archive) ARCHIVE="$(cd "$(dirname "$2")" 2>/dev/null && pwd)/$(basename "$2")"; shift ;;
    --lirpa-path) LIRPA="$(cd "$2" && pwd)"; shift ;;
    --commit) COMMIT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_suite.sh: one output folder, got $OUT and $1" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { usage >&2; exit 2; }
PY="${PY:-$(pick_python)}"
if [ "$MERGE" = 1 ]; then exec "$PY" benchmarks/common.py merge "$OUT"; fi
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do step_rows | cut -f1 | grep -qx "$s" || { echo "gpu_suite.sh: no step '$s' (--list)" >&2; exit 2; }; done
fi
[[ -z "$BUDGET" || "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget takes seconds, got $BUDGET" >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
# the checkout's code, whether or not the build step installs it; ROBUSTKERN_JIT=0: a test never compiles the
# extension behind the suite's back; on the GPU the tests run the compiled Triton kernels, not the interpreter
export PY PYTHONUNBUFFERED=1 ROBUSTKERN_JIT=0 PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ "$DRY" = 1 ] || export TRITON_INTERPRET=0
export DRY OUT
run_suite
