#!/usr/bin/env bash
# The whole CIFAR-10 experiment in one command, for one short GPU window (about 9 minutes on an H200):
#   scripts/cifar10_window.sh DATA_DIR OUT_DIR
# DATA_DIR holds cifar10 (torchvision pickles or an ImageFolder tree such as ../shared/data/cifar10-jpeg,
# or a folder with a child named like it). On a bare, offline machine with python, torch, torchvision,
# timm, pandas and matplotlib installed it
#   1. installs this checkout without network into .window/site (a wheel from .whl/ if there is one,
#      else pip from the source tree, else a plain copy of the packages);
#   2. trains the WRN-40-2 teacher with `--recipe fast`, or reuses the one in the teacher cache;
#   3. trains the nine runs of experiments/cifar10_window.toml (ABM / DFKD-Mem / MAD x seeds 0, 1, 2),
#      3 at a time on the GPU (--runs-per-gpu 3);
#   4. writes the report and copies records, tables, figures, sample grids, the teacher's metadata and
#      this log -- never checkpoints -- into OUT_DIR.
# Progress lines carry UTC timestamps and seconds since the start. Run again after an interruption: the
# teacher and finished runs are reused and unfinished runs resume from their checkpoints (.window/).
#
# Environment (all optional):
#   PYTHON                   interpreter (default python3)
#   WINDOW_DIR               work folder: site, teacher cache, run folders (default REPO/.window)
#   WINDOW_TEACHER_CACHE     teacher cache (default WINDOW_DIR/teachers); decoded images go to its tensors/
#   WINDOW_RUNS_PER_GPU      runs trained at once (default 3)
#   WINDOW_DEVICE            auto | cuda | cpu (default auto)
#   WINDOW_BUDGET_OVERRIDES  extra sweep flags, e.g. for a CPU check of the whole chain:
#                            "--set epochs=1 --set steps_per_epoch=2 --set student_steps=2 --set batch_size=16"
#   WINDOW_TEACHER_EPOCHS    teacher epochs instead of the recipe's (a CPU check: 1)
#   WINDOW_TEACHER_ARGS      extra `teacher train` flags (e.g. "--batch-size 64")
#   WINDOW_DEADLINE_S        seconds after the start by which the runs are stopped and checkpointed so that
#                            the report still gets written (default 510, i.e. 8.5 min; 0: no limit)
#   WINDOW_REPORT_RESERVE_S  seconds kept for the report and the copy (default 45)
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: scripts/cifar10_window.sh DATA_DIR OUT_DIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="$(cd "$1" 2>/dev/null && pwd)" || { echo "error: data folder $1 does not exist" >&2; exit 2; }
mkdir -p "$2"
OUT_DIR="$(cd "$2" && pwd)"
PYTHON="${PYTHON:-python3}"
WINDOW_DIR="${WINDOW_DIR:-$REPO/.window}"
SITE="$WINDOW_DIR/site"
TEACHERS="${WINDOW_TEACHER_CACHE:-$WINDOW_DIR/teachers}"
RESULTS="$WINDOW_DIR/results"
EXPERIMENT="$REPO/experiments/cifar10_window.toml"
K="${WINDOW_RUNS_PER_GPU:-3}"
DEVICE="${WINDOW_DEVICE:-auto}"
DEADLINE="${WINDOW_DEADLINE_S:-510}"
REPORT_RESERVE="${WINDOW_REPORT_RESERVE_S:-45}"
mkdir -p "$WINDOW_DIR" "$TEACHERS" "$RESULTS"
WINDOW_DIR="$(cd "$WINDOW_DIR" && pwd)"
cd "$WINDOW_DIR"  # not the checkout: python would import the source tree instead of the installed copy
exec > >(tee -a "$OUT_DIR/window.log") 2>&1

log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
dfkd() { PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'import sys; from dfkd_bench.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

log "cifar10 window: data $DATA_DIR -> $OUT_DIR (work folder $WINDOW_DIR)"
"$PYTHON" - <<'EOF'
import platform, torch, torchvision
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, GPU: {gpu}")
EOF

# ---- 1. install this checkout, offline ------------------------------------------------------------
log "installing the project into $SITE (no network)"
rm -rf "$SITE"
mkdir -p "$SITE"
WHEEL="$(ls -t "$REPO"/.whl/dfkd_bench-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -n "$WHEEL" ]] && "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEEL"; then
    log "installed the wheel $WHEEL"
elif rm -rf "$WINDOW_DIR/src" && mkdir -p "$WINDOW_DIR/src" \
        && cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/dfkd_bench" "$REPO/methods" "$WINDOW_DIR/src/" \
        && "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" \
            "$WINDOW_DIR/src" 2>"$WINDOW_DIR/pip.err"; then
    # (built from a copy: setuptools' build/ folder would otherwise land in the checkout)
    log "installed from the source tree with pip"
else
    # pip without setuptools/wheel cannot build: lay the packages out as pyproject.toml maps them
    log "pip could not build offline ($(tail -n 1 "$WINDOW_DIR/pip.err")); copying the packages instead"
    rm -rf "$SITE" && mkdir -p "$SITE"
    cp -r "$REPO/dfkd_bench" "$SITE/dfkd_bench"
    rm -rf "$SITE/dfkd_bench/methods" && cp -r "$REPO/methods" "$SITE/dfkd_bench/methods"
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
fi
if "$PYTHON" -c 'import submitit' 2>/dev/null; then
    log "submitit is installed (not needed: the runs are packed by the inline launcher)"
else
    log "submitit is not installed; the inline launcher does not need it"
fi
dfkd list >/dev/null
log "dfkd-bench $(PYTHONPATH="$SITE" "$PYTHON" -c 'import dfkd_bench, os; print(os.path.dirname(dfkd_bench.__file__))')"

# ---- 2. teacher ------------------------------------------------------------------------------------
TEACHER="$TEACHERS/cifar10-wrn40_2.pt"
if [[ -f "$TEACHER" ]]; then
    log "reusing the teacher $TEACHER"
else
    EPOCHS=()
    [[ -n "${WINDOW_TEACHER_EPOCHS:-}" ]] && EPOCHS=(--epochs "$WINDOW_TEACHER_EPOCHS")
    log "training the WRN-40-2 teacher (--recipe fast ${EPOCHS[*]:-} ${WINDOW_TEACHER_ARGS:-})"
    # shellcheck disable=SC2086
    dfkd teacher train --dataset cifar10 --arch wrn40_2 --recipe fast --data-root "$DATA_DIR" \
        --teacher-cache "$TEACHERS" --device "$DEVICE" --no-progress "${EPOCHS[@]}" ${WINDOW_TEACHER_ARGS:-}
fi
PYTHONPATH="$SITE" "$PYTHON" - "$TEACHER" "$OUT_DIR/teacher.json" <<'EOF'
import json, sys, torch
meta = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["meta"]
with open(sys.argv[2], "w") as handle:
    json.dump(meta, handle, indent=1, default=str)
print(f"teacher: {meta['test_accuracy']:.2f} % on the test split, trained in {meta['train_seconds']:.0f} s "
      f"({meta.get('pipeline', '?')} pipeline, data {meta.get('data_seconds', float('nan')):.0f} s, "
      f"recipe {meta['recipe'].get('name', '?')}, {meta['recipe']['epochs']} epochs, device {meta['device']})")
EOF
log "teacher ready"

# ---- 3. the nine runs ------------------------------------------------------------------------------
PACK=(--runs-per-gpu "$K")
SWEEP_HELP="$(dfkd sweep --help)"
if [[ "$SWEEP_HELP" != *--runs-per-gpu* ]]; then
    log "WARNING: this checkout's sweep has no --runs-per-gpu; training the runs one at a time"
    PACK=()
fi
log "training the runs: dfkd-bench sweep $EXPERIMENT ${PACK[*]:-} ${WINDOW_BUDGET_OVERRIDES:-}"
status=0
LIMIT=()
if [[ "$DEADLINE" -gt 0 ]]; then
    # stop the runs (SIGTERM: each finishes its iteration and checkpoints) so that the report and the
    # copy still happen inside the window; the same command later resumes them
    LEFT=$((DEADLINE - SECONDS - REPORT_RESERVE - 15))  # 15: the --kill-after grace below
    [[ "$LEFT" -lt 10 ]] && LEFT=10
    log "the runs get at most ${LEFT} s (WINDOW_DEADLINE_S=$DEADLINE, ${REPORT_RESERVE} s kept for the report)"
    LIMIT=(timeout --signal=TERM --kill-after=15 "$LEFT")
fi
# shellcheck disable=SC2086
"${LIMIT[@]}" env PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'import sys; from dfkd_bench.cli import main; sys.exit(main(sys.argv[1:]))' \
    sweep "$EXPERIMENT" --data-root "$DATA_DIR" --teacher-cache "$TEACHERS" --results-dir "$RESULTS" \
    --device "$DEVICE" --no-progress "${PACK[@]}" ${WINDOW_BUDGET_OVERRIDES:-} || status=$?
[[ "$status" -eq 124 ]] && log "deadline reached: the runs were stopped and checkpointed; run the script again to resume them"
log "runs finished (sweep exit status $status)"
dfkd status --results-dir "$RESULTS" || true

# ---- 4. report and what comes back -----------------------------------------------------------------
log "writing the report"
dfkd report --results-dir "$RESULTS" --out "$OUT_DIR/report" || status=$?
log "copying records (no checkpoints) to $OUT_DIR/runs"
mkdir -p "$OUT_DIR/runs"
(cd "$RESULTS" && tar cf - --exclude=checkpoints --exclude='*.pt' --exclude='*.pth' --exclude=lock \
    --exclude=heartbeat --exclude=_submitit .) | (cd "$OUT_DIR/runs" && tar xf -)
{
    echo "scripts/cifar10_window.sh $*"
    echo "commit $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "WINDOW_RUNS_PER_GPU=$K WINDOW_DEVICE=$DEVICE WINDOW_BUDGET_OVERRIDES=${WINDOW_BUDGET_OVERRIDES:-} WINDOW_TEACHER_EPOCHS=${WINDOW_TEACHER_EPOCHS:-}"
} > "$OUT_DIR/command.txt"
log "done: $(find "$OUT_DIR" -type f | wc -l) files, $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR"
exit "$status"
