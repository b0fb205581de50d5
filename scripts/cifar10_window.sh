#!/usr/bin/env bash
# The whole CIFAR-10 experiment in one command, for one short GPU window (about 9 minutes on an H200):
#   scripts/cifar10_window.sh DATA OUT_DIR [--device cpu] [--deadline S]
# DATA is cifar10 as torchvision pickles or an ImageFolder tree (such as ../shared/data/cifar10-jpeg, or
# a folder with a child named like it), or the archive scripts/pack_data.sh makes of it
# (.carry/cifar10-jpeg.tar.xz, 18.6 MB: what fits beside the ~20 MiB tracked tree in the 64 MiB a device
# call carries; unpacked once into .window/data/). On a bare, offline machine with python, torch,
# torchvision, timm, pandas and matplotlib installed it
#   1. installs this checkout without network (scripts/window_lib.sh: a carried wheel .whl/dfkd_bench-*.whl,
#      else pip from the source tree, else a plain copy of the packages);
#   2. trains the WRN-40-2 teacher with `--recipe fast`, or reuses the one in the teacher cache; the
#      training checkpoints every epoch and is stopped by the deadline like the runs (it resumes);
#   3. trains the nine runs of experiments/cifar10_window.toml (ABM / DFKD-Mem / MAD x seeds 0, 1, 2),
#      3 at a time on the GPU (--runs-per-gpu 3), stopped and checkpointed at the deadline;
#   4. writes the report; puts records, tables, figures, sample grids, the teacher's metadata and the log
#      -- never checkpoints -- into OUT_DIR/cifar10_window.tar.gz, and the summary (status, steps,
#      teacher accuracy, runs' state) into OUT_DIR/cifar10_window.json: two files, nothing else.
# Without a CUDA GPU it stops at once with one line, unless --device cpu is given (a CPU check of the
# chain). Progress lines carry UTC timestamps and seconds since the start. Run it again after a deadline
# or an interruption: the data, the teacher (or its last epoch) and finished runs are reused, unfinished
# runs resume from their checkpoints (all kept in .window/, which a warm device machine keeps between calls).
#
# Options: --device cpu|cuda (default cuda); --deadline S: seconds after the start by which everything
# is stopped, checkpointed and packed (default $WINDOW_DEADLINE_S or 510, i.e. 8.5 min of a 10-min call).
# Environment (all optional):
#   PYTHON                   interpreter (default python3)
#   WINDOW_DIR               work folder: site, data, teacher cache, run folders (default REPO/.window)
#   WINDOW_TEACHER_CACHE     teacher cache (default WINDOW_DIR/teachers); decoded images go to its tensors/
#   WINDOW_RUNS_PER_GPU      runs trained at once (default 3)
#   WINDOW_BUDGET_OVERRIDES  extra sweep flags, e.g. for a CPU check of the whole chain:
#                            "--set epochs=1 --set steps_per_epoch=2 --set student_steps=2 --set batch_size=16"
#   WINDOW_TEACHER_EPOCHS    teacher epochs instead of the recipe's (a CPU check: 1)
#   WINDOW_TEACHER_ARGS      extra `teacher train` flags (e.g. "--batch-size 64")
#   WINDOW_REPORT_RESERVE_S  seconds kept for the report and the packing (default 45)
#   WINDOW_GRACE_S           seconds between a step's SIGTERM and SIGKILL (default 20)
set -euo pipefail

# shellcheck source=scripts/window_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/window_lib.sh"
window_data_arg "scripts/cifar10_window.sh DATA OUT_DIR [--device cpu] [--deadline S]" \
    "pass the CIFAR-10 folder or the archive of scripts/pack_data.sh" "$@"
window_init cifar10_window "$2" "${WINDOW_DEADLINE_S:-510}" "${@:3}"
if [[ ${#WINDOW_ARGS[@]} -gt 0 ]]; then
    echo "error: unknown option ${WINDOW_ARGS[0]}; use --device cpu or --deadline S" >&2
    WINDOW_STATUS=no_gpu
    exit 2
fi
window_check_device
TEACHERS="${WINDOW_TEACHER_CACHE:-$WINDOW_DIR/teachers}"
RESULTS="$WINDOW_DIR/results"
EXPERIMENT="$REPO/experiments/cifar10_window.toml"
K="${WINDOW_RUNS_PER_GPU:-3}"
REPORT_RESERVE="${WINDOW_REPORT_RESERVE_S:-45}"
mkdir -p "$TEACHERS" "$RESULTS"
window_install

# ---- data: a folder as it is, an archive unpacked once --------------------------------------------
window_data "$DATA_ARG"

# ---- teacher (checkpointed per epoch; the deadline stops it, the next call resumes it) --------------
TEACHER="$TEACHERS/cifar10-wrn40_2.pt"
if [[ -f "$TEACHER" ]]; then
    log "reusing the teacher $TEACHER"
else
    EPOCHS=()
    [[ -n "${WINDOW_TEACHER_EPOCHS:-}" ]] && EPOCHS=(--epochs "$WINDOW_TEACHER_EPOCHS")
    # shellcheck disable=SC2086
    window_step teacher "$((REPORT_RESERVE + 30))" "$DFKD" teacher train --dataset cifar10 --arch wrn40_2 \
        --recipe fast --data-root "$DATA_DIR" --teacher-cache "$TEACHERS" --device "$WINDOW_DEVICE" --no-progress \
        "${EPOCHS[@]+"${EPOCHS[@]}"}" ${WINDOW_TEACHER_ARGS:-}
fi
if [[ -f "$TEACHER" ]]; then
    "$PYSITE" - "$TEACHER" "$STAGE/teacher.json" <<'EOF'
import json, sys, torch
meta = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["meta"]
with open(sys.argv[2], "w") as handle:
    json.dump(meta, handle, indent=1, default=str)
print(f"teacher: {meta['test_accuracy']:.2f} % on the test split, trained in {meta['train_seconds']:.0f} s "
      f"({meta.get('pipeline', '?')} pipeline, data {meta.get('data_seconds', float('nan')):.0f} s, "
      f"recipe {meta['recipe'].get('name', '?')}, {meta['recipe']['epochs']} epochs, device {meta['device']})")
EOF
    window_result teacher "$STAGE/teacher.json"
    log "teacher ready"

    # ---- the nine runs -------------------------------------------------------------------------------
    # shellcheck disable=SC2086
    window_step runs "$REPORT_RESERVE" "$DFKD" sweep "$EXPERIMENT" --data-root "$DATA_DIR" \
        --teacher-cache "$TEACHERS" --results-dir "$RESULTS" --device "$WINDOW_DEVICE" --no-progress \
        --runs-per-gpu "$K" ${WINDOW_BUDGET_OVERRIDES:-}
    window_wait_locks "$RESULTS"  # workers stopped by the deadline checkpoint after their iteration
else
    log "no teacher yet (the deadline stopped its training after a checkpoint): run the script again to go on"
    WINDOW_INCOMPLETE=1
fi
dfkd status --results-dir "$RESULTS" >"$STAGE/status.txt" 2>&1 || true
cat "$STAGE/status.txt"

# ---- report and what comes back -------------------------------------------------------------------
if compgen -G "$RESULTS/*/config.json" >/dev/null; then
    window_step report 0 "$DFKD" report --results-dir "$RESULTS" --out "$STAGE/report"
    window_collect_runs "$RESULTS"
fi
