# shellcheck shell=bash
# The machinery of a short GPU window, shared by scripts/gpu_check.sh, scripts/cifar10_window.sh and
# scripts/reproduce_window.sh (source it; it defines functions and globals, runs nothing itself).
#
# A window script is a stand-alone, resumable, deadline-bound command for a machine lent for minutes
# (at most 10 minutes a command, 8 files back): it
#   * fails fast, with ONE line, when no CUDA GPU is visible -- unless it was given `--device cpu`
#     (a CPU check of the whole chain; speed targets are then "not judged on CPU");
#   * prints timestamped progress ("[HH:MM:SS +Ns] ...") and keeps it in its log;
#   * installs this checkout without network (a carried wheel .whl/dfkd_bench-*.whl, else pip from a
#     copy of the source, else a plain copy of the packages) into WINDOW_DIR/site;
#   * runs each step under the deadline: SIGTERM when its time is up (dfkd-bench runs and teacher
#     training checkpoint and stop; the same command later resumes them), SIGKILL only after a grace;
#   * leaves exactly two files directly in OUT_DIR: NAME.tar.gz (log, records, tables, figures,
#     never checkpoints) and NAME.json (the summary: status, steps, device, per-step results), also
#     when a step fails or the deadline cuts it short (an EXIT trap writes them).
#
#   window_data_arg USAGE HINT "$@"                   DATA_ARG from DATA OUT_DIR ..., or usage / one error line
#   window_init NAME OUT_DIR DEFAULT_DEADLINE_S "$@"   parses --device cpu|cuda and --deadline S
#   log MESSAGE                                       a timestamped progress line
#   window_check_device                               the one-line failure without a GPU
#   window_install                                    this checkout into $SITE
#   dfkd ARGS... / $DFKD ARGS...                      the installed dfkd-bench (function / program)
#   $PYSITE ARGS...                                   python with the installed copy on its path
#   window_left                                       seconds left before the deadline
#   window_step NAME RESERVE_S [--max S] PROGRAM...   PROGRAM under the deadline minus RESERVE_S seconds
#   window_wait_locks DIR                             wait until no run under DIR is being trained
#   window_data DATA                                  DATA_DIR: a data folder, or an archive unpacked once
#   window_collect_runs RESULTS                       records (no checkpoints) + per-run accuracies to the summary
#   window_result KEY JSON_FILE                       a step's JSON result, merged into the summary
#   WINDOW_INCOMPLETE=1                               the summary's status is "incomplete", not "done"
#
# A new window is a few lines, e.g. a reproduction window (DATA_DIR holding MNIST):
#   source "$(dirname "${BASH_SOURCE[0]}")/window_lib.sh"
#   window_init reproduce_window "$2" 510 "${@:3}"; window_check_device; window_install
#   window_step sweep 60 "$DFKD" sweep "$REPO"/experiments/reproduce/{dafl,dfad}_mnist.toml --data-root "$1" \
#       --results-dir "$WINDOW_DIR/reproduce" --device "$WINDOW_DEVICE" --no-progress --runs-per-gpu 3
#   window_wait_locks "$WINDOW_DIR/reproduce"
#   window_step report 0 "$DFKD" report --results-dir "$WINDOW_DIR/reproduce" --out "$STAGE/report"
# (then copy the records without checkpoints into $STAGE, as cifar10_window.sh does).
#
# Environment: PYTHON (python3), WINDOW_DIR (REPO/.window: site, data, teachers, runs -- ignored by
# git, kept between calls on a warm machine), WINDOW_GRACE_S (20: SIGTERM -> SIGKILL grace).

# window_data_arg USAGE HINT "$@": DATA_ARG, the script's first argument as an absolute path; with fewer
# than two arguments (DATA OUT_DIR), or a DATA that does not exist, one line and exit status 2.
window_data_arg() {
    local usage="$1" hint="$2"
    shift 2
    if [[ $# -lt 2 || "$1" == -* || "$2" == -* ]]; then
        echo "usage: $usage" >&2
        exit 2
    fi
    if [[ ! -e "$1" ]]; then
        echo "error: data $1 does not exist; $hint" >&2
        exit 2
    fi
    DATA_ARG="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

window_init() {
    WINDOW_NAME="$1"
    local out="$2"
    WINDOW_DEADLINE="$3"
    shift 3
    WINDOW_DEVICE="cuda"
    WINDOW_ARGS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --device) WINDOW_DEVICE="${2:-}"; shift 2 ;;
            --device=*) WINDOW_DEVICE="${1#--device=}"; shift ;;
            --deadline) WINDOW_DEADLINE="${2:-}"; shift 2 ;;
            --deadline=*) WINDOW_DEADLINE="${1#--deadline=}"; shift ;;
            *) WINDOW_ARGS+=("$1"); shift ;;
        esac
    done
    case "$WINDOW_DEVICE" in
        cpu|cuda|cuda:[0-9]*) ;;
        *) echo "error: --device $WINDOW_DEVICE is not cpu or cuda; pass --device cpu for a CPU check" >&2; exit 2 ;;
    esac
    if ! [[ "$WINDOW_DEADLINE" =~ ^[0-9]+$ ]] || [[ "$WINDOW_DEADLINE" -lt 30 ]]; then
        echo "error: --deadline $WINDOW_DEADLINE must be a whole number of seconds >= 30" >&2
        exit 2
    fi
    REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    PYTHON="${PYTHON:-python3}"
    mkdir -p "$out" || { echo "error: cannot create the output folder $out" >&2; exit 2; }
    OUT_DIR="$(cd "$out" && pwd)"
    WINDOW_DIR="${WINDOW_DIR:-$REPO/.window}"
    mkdir -p "$WINDOW_DIR"
    WINDOW_DIR="$(cd "$WINDOW_DIR" && pwd)"
    SITE="$WINDOW_DIR/site"
    STAGE="$WINDOW_DIR/$WINDOW_NAME/stage"  # what goes into the tarball (rebuilt by every call)
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    WINDOW_LOG="$STAGE/$WINDOW_NAME.log"
    WINDOW_STEPS="$STAGE/steps.jsonl"
    WINDOW_GRACE="${WINDOW_GRACE_S:-20}"
    WINDOW_STATUS="running"
    WINDOW_INCOMPLETE=""
    WINDOW_STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    SECONDS=0
    exec 3>&1 4>&2
    exec > >(tee -a "$WINDOW_LOG") 2>&1
    WINDOW_TEE_PID=$!
    trap window_finish EXIT
    trap 'log "signal: stopping"; WINDOW_STATUS=stopped; exit 130' INT TERM
}

log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

window_left() { echo $((WINDOW_DEADLINE - SECONDS)); }

window_check_device() {
    local start="$WINDOW_NAME: device $WINDOW_DEVICE, deadline ${WINDOW_DEADLINE} s, output $OUT_DIR/$WINDOW_NAME.{tar.gz,json}, work folder $WINDOW_DIR"
    if [[ "$WINDOW_DEVICE" == cpu ]]; then
        log "$start"
        log "device: cpu (a check of the whole chain; GPU targets are not judged on CPU)"
        return 0
    fi
    local why
    if ! why="$("$PYTHON" -c '
import sys
try:
    import torch
except Exception as error:
    print(f"torch cannot be imported ({error})"); sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda})"); sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}")
' 2>&1)"; then
        WINDOW_STATUS="no_gpu"
        echo "error: $WINDOW_NAME needs a CUDA GPU: $(echo "$why" | tail -n 1); run it on a GPU machine, or pass --device cpu for a CPU check" >&2
        exit 2
    fi
    log "$start"
    log "device: $why"
}

window_install() {
    log "installing the project into $SITE (no network)"
    rm -rf "$SITE"
    mkdir -p "$SITE"
    local wheel
    wheel="$(ls -t "$REPO"/.whl/dfkd_bench-*.whl 2>/dev/null | head -n 1 || true)"
    if [[ -n "$wheel" ]] && "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$wheel" >/dev/null 2>&1; then
        log "installed the carried wheel $wheel"
    elif rm -rf "$WINDOW_DIR/src" && mkdir -p "$WINDOW_DIR/src" \
            && cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/dfkd_bench" "$REPO/methods" "$WINDOW_DIR/src/" \
            && "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" \
                "$WINDOW_DIR/src" >"$WINDOW_DIR/pip.err" 2>&1; then
        # (built from a copy: setuptools' build/ folder would otherwise land in the checkout)
        log "installed from the source tree with pip"
    else
        log "pip could not build offline ($(tail -n 1 "$WINDOW_DIR/pip.err" 2>/dev/null)); copying the packages instead"
        rm -rf "$SITE" && mkdir -p "$SITE"
        cp -r "$REPO/dfkd_bench" "$SITE/dfkd_bench"
        rm -rf "$SITE/dfkd_bench/methods" && cp -r "$REPO/methods" "$SITE/dfkd_bench/methods"
        find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
    fi
    window_commands
    dfkd list >/dev/null
}

# The installed copy as commands (timeout runs programs, not shell functions). They run from WINDOW_DIR,
# not the checkout: python would import the source tree instead of the installed copy.
window_commands() {
    mkdir -p "$WINDOW_DIR/bin"
    cat >"$WINDOW_DIR/bin/dfkd-bench" <<EOF
#!/usr/bin/env bash
cd "$WINDOW_DIR" && PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}" exec "$PYTHON" -c 'import sys; from dfkd_bench.cli import main; sys.exit(main(sys.argv[1:]))' "\$@"
EOF
    cat >"$WINDOW_DIR/bin/python-site" <<EOF
#!/usr/bin/env bash
cd "$WINDOW_DIR" && PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}" exec "$PYTHON" "\$@"
EOF
    chmod +x "$WINDOW_DIR/bin/dfkd-bench" "$WINDOW_DIR/bin/python-site"
    DFKD="$WINDOW_DIR/bin/dfkd-bench"
    PYSITE="$WINDOW_DIR/bin/python-site"
}
dfkd() { "$WINDOW_DIR/bin/dfkd-bench" "$@"; }

# window_step NAME RESERVE_S [--max S] COMMAND...: COMMAND (a program) gets the time left minus
# RESERVE_S (what later steps need) and the SIGKILL grace, at most S seconds; exit status 124 means the
# deadline stopped it (SIGTERM). A step never fails the script: its status goes into the summary.
window_step() {
    local name="$1" reserve="$2"
    shift 2
    local most=""
    if [[ "${1:-}" == --max ]]; then most="$2"; shift 2; fi
    local limit=$(( $(window_left) - reserve - WINDOW_GRACE ))
    [[ -n "$most" && "$limit" -gt "$most" ]] && limit="$most"
    local started=$SECONDS status=0
    if [[ "$limit" -lt 5 ]]; then
        log "step $name: skipped (${limit} s left for it; the deadline is near)"
        printf '{"step": "%s", "status": "skipped", "exit": null, "seconds": 0}\n' "$name" >>"$WINDOW_STEPS"
        return 0
    fi
    log "step $name: start (at most ${limit} s)"
    timeout --signal=TERM --kill-after="$WINDOW_GRACE" "$limit" "$@" || status=$?
    local how="done"
    [[ "$status" -eq 124 ]] && how="deadline" && WINDOW_INCOMPLETE=1
    [[ "$status" -eq 137 ]] && how="killed" && WINDOW_INCOMPLETE=1
    [[ "$status" -ne 0 && "$status" -ne 124 && "$status" -ne 137 ]] && how="failed"
    log "step $name: $how (exit status $status, $((SECONDS - started)) s)"
    printf '{"step": "%s", "status": "%s", "exit": %d, "seconds": %d}\n' "$name" "$how" "$status" \
        "$((SECONDS - started))" >>"$WINDOW_STEPS"
    return 0
}

# Packed runs' workers outlive a launcher that timeout killed by an iteration (they get SIGTERM and
# checkpoint): wait, up to WINDOW_GRACE seconds, until no run folder under DIR is locked.
window_wait_locks() {
    local dir="$1" lock
    [[ -d "$dir" ]] || return 0
    while IFS= read -r -d '' lock; do
        flock -w "$WINDOW_GRACE" "$lock" true 2>/dev/null || log "run $(basename "$(dirname "$lock")") is still locked"
    done < <(find "$dir" -maxdepth 2 -name lock -print0)
}

# window_data DATA: DATA_DIR is DATA when it is a folder, else the folder WINDOW_DIR/data into which the
# archive DATA (scripts/pack_data.sh) is unpacked once (again only when the archive changed).
window_data() {
    local archive="$1"
    if [[ -d "$archive" ]]; then
        DATA_DIR="$archive"
        return 0
    fi
    DATA_DIR="$WINDOW_DIR/data"
    local stamp
    stamp="$(stat -c '%s %Y' "$archive") $(basename "$archive")"
    if [[ -f "$DATA_DIR/.unpacked" && "$(cat "$DATA_DIR/.unpacked")" == "$stamp" ]]; then
        log "data: reusing $DATA_DIR (unpacked from $archive earlier)"
        return 0
    fi
    log "data: unpacking $archive into $DATA_DIR"
    rm -rf "$DATA_DIR" && mkdir -p "$DATA_DIR"
    "$PYTHON" - "$archive" "$DATA_DIR" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    # the data filter: regular files and folders only, nothing outside DATA_DIR, no links, no devices
    archive.extractall(sys.argv[2], filter="data")
EOF
    echo "$stamp" >"$DATA_DIR/.unpacked"
    log "data: $(find "$DATA_DIR" -type f ! -name .unpacked | wc -l) files unpacked"
}

# window_collect_runs RESULTS: the run folders' records, configs and states -- never checkpoints, nor the
# checkpoint.json pointing at one (stale once the checkpoint stays behind) -- into
# STAGE/runs, and per run (done, last and best test accuracy) into the summary's results.runs.
window_collect_runs() {
    local results="$1"
    log "copying records (no checkpoints)"
    mkdir -p "$STAGE/runs"
    (cd "$results" && tar cf - --exclude=checkpoints --exclude='*.pt' --exclude='*.pth' --exclude=lock \
        --exclude=heartbeat --exclude=_submitit --exclude=checkpoint.json .) | (cd "$STAGE/runs" && tar xf -)
    "$PYTHON" - "$results" "$STAGE/runs.json" <<'EOF'
import json, sys
from pathlib import Path
runs = {}
for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "config.json").exists()):
    records = folder / "records.jsonl"
    evals = []
    if records.exists():
        for line in records.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill
                continue
            if record.get("kind") == "eval" and "test_accuracy" in record:
                evals.append(record)
    runs[folder.name] = {"done": (folder / "done").exists(), "last_step": evals[-1]["step"] if evals else None,
                         "last_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
                         "best_test_accuracy": max(r["test_accuracy"] for r in evals) if evals else None}
Path(sys.argv[2]).write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
EOF
    window_result runs "$STAGE/runs.json"
}

window_result() {  # window_result KEY FILE: FILE's JSON under "results"."KEY" of the summary
    [[ -f "$2" ]] && cp "$2" "$STAGE/result.$1.json"
    return 0
}

window_finish() {
    local code=$?
    trap - EXIT
    [[ "$WINDOW_STATUS" == running ]] && { [[ "$code" -eq 0 ]] && WINDOW_STATUS="done" || WINDOW_STATUS="failed"; }
    # a step cut by the deadline: its work is checkpointed, and the same command goes on from there
    [[ "$WINDOW_STATUS" == done && -n "${WINDOW_INCOMPLETE:-}" ]] && WINDOW_STATUS="incomplete"
    if [[ "$WINDOW_STATUS" == no_gpu ]]; then  # nothing ran: no tarball, the one error line says why
        exec 1>&3 2>&4
        wait "$WINDOW_TEE_PID" 2>/dev/null || true
        exit "$code"
    fi
    log "finishing: status $WINDOW_STATUS (exit status $code), writing $OUT_DIR/$WINDOW_NAME.tar.gz and .json"
    {
        echo "scripts/$WINDOW_NAME.sh (device $WINDOW_DEVICE, deadline $WINDOW_DEADLINE s)"
        echo "commit $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    } >"$STAGE/command.txt"
    exec 1>&3 2>&4
    wait "$WINDOW_TEE_PID" 2>/dev/null || true
    WINDOW_CODE="$code" "$PYTHON" - "$STAGE" "$OUT_DIR/$WINDOW_NAME.json" "$WINDOW_NAME" "$WINDOW_STATUS" \
        "$WINDOW_DEVICE" "$WINDOW_STARTED" "$SECONDS" "$WINDOW_DEADLINE" <<'EOF' || echo "error: the summary could not be written" >&2
import json, os, subprocess, sys
from pathlib import Path
stage, out, name, status, device, started, seconds, deadline = sys.argv[1:]
steps = []
steps_path = Path(stage) / "steps.jsonl"
if steps_path.exists():
    steps = [json.loads(line) for line in steps_path.read_text().splitlines() if line.strip()]
results = {}
for path in sorted(Path(stage).glob("result.*.json")):
    try:
        results[path.name[len("result."):-len(".json")]] = json.loads(path.read_text())
    except ValueError as error:
        results[path.name] = {"error": f"unreadable: {error}"}
commit = (Path(stage) / "command.txt").read_text().splitlines()[1].split(" ", 1)[1]
summary = {"script": name, "status": status, "exit_status": int(os.environ.get("WINDOW_CODE", "0")),
           "device": device, "started": started, "seconds": int(seconds), "deadline_s": int(deadline),
           "commit": commit, "steps": steps, "results": results,
           "resume": "run the same command again: finished steps are reused, stopped runs resume"}
Path(out).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str, allow_nan=False) + "\n")
EOF
    tar -C "$STAGE" -czf "$OUT_DIR/$WINDOW_NAME.tar.gz" . \
        || echo "error: the tarball could not be written" >&2
    echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $WINDOW_NAME: $WINDOW_STATUS; $(du -h "$OUT_DIR/$WINDOW_NAME.tar.gz" 2>/dev/null | cut -f1) tarball + summary in $OUT_DIR"
    exit "$code"
}
