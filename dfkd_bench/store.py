"""Run folders: configuration, records, checkpoints and markers, written safely.

One folder per run, named by the run's configuration hash::

    <results_dir>/<method>-<dataset>-<student>-s<seed>-<hash>/
        config.json        resolved configuration, versions, git commit, device
        records.jsonl      append-only: one JSON object per evaluation / drift / sample event
        checkpoint.json    pointer to the newest complete checkpoint
        checkpoints/       it<N>.rank<r>.pt, everything needed to resume exactly (after a stop
                           in the middle of a stage: it<N>.<stage><steps>.rank<r>.pt)
        samples/           PNG sample grids
        student.pt         final student weights (state_dict)
        error.txt          the last error of a failed attempt
        heartbeat          touched while the run makes progress
        done               written last; holds the final summary

Every JSON file is strict JSON (RFC 8259), readable by ``jq``, pandas and other
languages: a non-finite float (NaN, +-inf, e.g. a diverged loss) is written as
``null``. Older records with bare ``NaN`` tokens are still read.

With ``DFKD_BENCH_TENSORBOARD=1`` (``--tensorboard``) every record is also
written as TensorBoard scalars into the run folder (``events.out.tfevents.*``),
so ``tensorboard --logdir results/runs`` follows runs live.

Every file that is replaced is written to a temporary file, fsynced and
renamed, so a kill at any moment leaves either the old or the new version.
Records are appended one whole line per ``write`` and fsynced; a checkpoint
holds the records written so far, and resuming rewrites ``records.jsonl``
from it (a start without a checkpoint empties it), so records are never
duplicated or torn. Each run holds an
exclusive ``flock`` on ``lock`` while it trains, so two jobs can never train
the same run at once; distinct runs never share a file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib.util
import io
import hashlib
import json
import math
import numbers
import os
import pickle
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfkd_bench.errors import CheckpointError, DfkdError, user_message

HEARTBEAT_STALE_SECONDS = 15 * 60
DEFAULT_RESULTS_DIR = "results/runs"
TENSORBOARD_ENV = "DFKD_BENCH_TENSORBOARD"
# Record fields that say what a record is, not what was measured: never TensorBoard scalars.
_NOT_SCALARS = frozenset({"kind", "step", "run", "method", "seed"})


class RecordsError(DfkdError):
    """A records file has a damaged line that is not the (torn) last one."""

    def __init__(self, path: Path, line: int, reason: str):
        super().__init__(f"{path}: line {line} {reason}; the records file is damaged (restore it from a copy, "
                         "or delete the run folder to run it again)")
        self.path, self.line, self.reason = Path(path), line, reason


def strict_json_value(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, ready for ``json.dumps(allow_nan=False)``.

    numpy scalars and 0-d tensors (anything with ``.item()``) become Python numbers first.
    """
    # CHOSEN: NaN and +-inf become null (not strings like "NaN"): every JSON reader takes null as a
    # missing value, pandas reads it as NaN, and a loss that was not finite is a missing measurement.
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and not isinstance(value, (bytes, bytearray)):
        try:
            return strict_json_value(value.item())
        except (TypeError, ValueError):
            return value
    if isinstance(value, numbers.Real):
        return strict_json_value(float(value))
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict_json_value` with ``allow_nan=False``: always strict JSON."""
    return json.dumps(strict_json_value(value), allow_nan=False, **kwargs)


def heartbeat_age(run_dir: Path) -> float | None:
    """Seconds since another host's trainer last showed progress on this run; None if it is not alive.

    On the host that wrote the heartbeat the run's ``flock`` says for certain
    whether a trainer is alive (a SIGKILLed one leaves a fresh heartbeat but no
    lock), so the heartbeat is only evidence for a trainer on another host,
    whose lock ``flock`` cannot see on every shared file system. It is stale
    after ``HEARTBEAT_STALE_SECONDS`` or once the run has written an error.
    """
    heartbeat = Path(run_dir) / "heartbeat"
    try:
        age = time.time() - heartbeat.stat().st_mtime
        writer = heartbeat.read_text().strip()
    except OSError:  # no heartbeat (yet), or unreadable
        return None
    if writer.split(":")[0] == socket.gethostname() or not writer:
        return None
    if age >= HEARTBEAT_STALE_SECONDS or (Path(run_dir) / "error.txt").exists():
        return None
    return age


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class DiskFullError(DfkdError):
    """A file could not be written for lack of space (its partial temporary file is removed)."""


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**20:.1f} MB free"


def atomic_write_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``.

    A failed write removes its temporary file (a full disk stays no fuller than before), and a
    lack of space is one line naming the file, its size and the free space. ``fault``: the
    ``DFKD_BENCH_FAULT`` value at which the process kills itself half-way through the write (tests).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if fault is not None and os.environ.get("DFKD_BENCH_FAULT") == fault:
                handle.write(data[:len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left to write {path} ({len(data) / 2**20:.2f} MB; {_free_space(path.parent)} on its "
                "file system); free some space and run the same command again (a run resumes from its last "
                "checkpoint)") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (dumps_strict(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


MAX_RECORD_BYTES = 2**20
"""A record line is under 1 KB (every committed run's); a longer one than this was not written by a run."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line from a kill is ignored.

    Strict JSON and the older bare ``NaN``/``Infinity`` tokens are both read.
    A line in the middle that is not valid UTF-8 or not valid JSON raises
    :class:`RecordsError` naming the file and the line (a kill can only tear
    the last line, so anything else is damage the user must know of), and so
    does a line no run writes: longer than :data:`MAX_RECORD_BYTES`, not a JSON
    object, a step that is not an iteration (an integer >= 0), a step before the
    previous record's (a run writes its records in order), or a second
    evaluation of one step (a line injected, or copied from another run).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    lines = data.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    previous, evaluated = 0, set()
    for number, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = number == len(lines) - 1
        if len(raw) > MAX_RECORD_BYTES:
            raise RecordsError(path, number + 1, f"is {len(raw) / 2**20:.1f} MB long (a run's records are under "
                                                 "1 KB each: not written by a run)")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            if last:  # a kill can cut a multi-byte character too
                break
            # CHOSEN: an error naming file and line, not a skipped line: a silently dropped record
            # would change a curve or a final accuracy without anyone knowing.
            raise RecordsError(path, number + 1, f"is not valid UTF-8 (byte {error.start + 1})") from None
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            if last:
                break
            raise RecordsError(path, number + 1, "is not valid JSON") from None
        if not isinstance(record, dict):
            raise RecordsError(path, number + 1, f"is a JSON {type(record).__name__}, not a record (an object)")
        step = record.get("step", previous)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise RecordsError(path, number + 1, f"has step {str(step)[:40]!r}, which is not an iteration "
                                                 "(an integer >= 0)")
        if step < previous:
            raise RecordsError(path, number + 1, f"goes back from step {previous} to step {step} (a run writes its "
                                                 "records in order)")
        if record.get("kind") == "eval":
            if step in evaluated:
                raise RecordsError(path, number + 1, f"is a second evaluation at step {step}")
            evaluated.add(step)
        previous = step
        records.append(record)
    return records


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file the suite wrote; a truncated or non-UTF-8 one is a one-line :class:`DfkdError` saying so."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DfkdError(f"{path} ({what}) does not exist") from None
    except IsADirectoryError:
        raise DfkdError(f"{path} ({what}) is a folder, not a file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = (f"not valid JSON at line {error.lineno}" if isinstance(error, json.JSONDecodeError)
                  else "not valid UTF-8")
        raise DfkdError(f"{path} ({what}) is damaged ({reason}; truncated?); restore it or delete the run "
                        "folder to run it again") from None


def tensorboard_enabled() -> bool:
    """True when runs write their records as TensorBoard scalars too (``DFKD_BENCH_TENSORBOARD=1``)."""
    return os.environ.get(TENSORBOARD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def tensorboard_missing_message() -> str:
    return ("--tensorboard needs the tensorboard package, which is not installed; "
            "install it with: pip install 'dfkd-bench[tensorboard]' (or pip install tensorboard)")


class TensorboardFlag(argparse.Action):
    """``--tensorboard``: sets ``DFKD_BENCH_TENSORBOARD=1``, which the runs (also launched as
    processes or SLURM jobs, which inherit the environment) read in :class:`RunStore`."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("help", "also write every record as TensorBoard scalars into the run folder "
                                  "(follow with: tensorboard --logdir RESULTS_DIR); needs the tensorboard extra")
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if importlib.util.find_spec("tensorboard") is None:
            parser.error(tensorboard_missing_message())
        os.environ[TENSORBOARD_ENV] = "1"
        setattr(namespace, self.dest, True)


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one record: ``eval/test_accuracy``, ``loss/kd_gen``,
    ``drift/js_gen`` ...; missing (null) and non-numeric values are left out."""
    kind = str(record.get("kind", "record"))
    scalars = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        tag = key if (kind == "eval" and "/" in key) else f"{kind}/{key}"
        scalars[tag] = float(value)
    return scalars


def _wait_for_a_later_second(directory: Path) -> None:
    """TensorBoard reads a folder's event files in the order of their names, which begin with the
    creation time in whole seconds and continue with host and process id. A file created in the
    same second as an older one (a run killed and resumed at once, by another process) could sort
    before it, and the older file's purge would then hide the newer points: wait (at most a second)
    until the clock is past every existing file's second."""
    stamps = []
    for path in directory.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    latest = max(stamps, default=0)
    if 0 <= latest - int(time.time()) <= 1:  # a file from another node's clock far ahead: cannot help
        time.sleep(max(0.0, latest + 1 - time.time()) + 0.01)


class _TensorBoardLog:
    """A SummaryWriter into the run folder (one event file per process start)."""

    def __init__(self, directory: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DfkdError(tensorboard_missing_message()) from None
        _wait_for_a_later_second(directory)
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            return
        for tag, value in record_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# The entries of a run folder the suite writes, replaces or deletes: none may be a symbolic link, so
# that nothing is ever written or deleted outside the run folder through one.
OWN_ENTRIES = ("checkpoints", "samples", "lock", "records.jsonl", "checkpoint.json", "config.json", "heartbeat",
               "student.pt", "done", "error.txt", "submitted.json")


class RunStore:
    """The files of one run."""

    def __init__(self, results_dir: str | os.PathLike, run_name: str):
        self.path = Path(results_dir) / run_name
        self.name = run_name
        self._tensorboard: _TensorBoardLog | None = None

    # -------------------------------------------------------------- paths ---
    config_path = property(lambda self: self.path / "config.json")
    records_path = property(lambda self: self.path / "records.jsonl")
    pointer_path = property(lambda self: self.path / "checkpoint.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    samples_dir = property(lambda self: self.path / "samples")
    student_path = property(lambda self: self.path / "student.pt")
    done_path = property(lambda self: self.path / "done")
    error_path = property(lambda self: self.path / "error.txt")
    heartbeat_path = property(lambda self: self.path / "heartbeat")
    lock_path = property(lambda self: self.path / "lock")

    # -------------------------------------------------------------- state ---
    def is_done(self) -> bool:
        return self.done_path.exists()

    def summary(self) -> dict[str, Any]:
        return read_json_file(self.done_path, "the run's summary (done file)")

    def status(self) -> str:
        """done, running, failed, incomplete or pending."""
        if self.done_path.exists():
            return "done"
        if self.is_locked() or heartbeat_age(self.path) is not None:
            return "running"
        if self.error_path.exists():
            return "failed"
        if self.pointer_path.exists() or self.records_path.exists():
            return "incomplete"
        return "pending"

    def last_error_line(self) -> str:
        try:
            text = self.error_path.read_text(errors="replace")
        except OSError:  # none, or a folder
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def write_heartbeat(self) -> None:
        """Name this host and process as the run's trainer (see ``heartbeat_age``)."""
        atomic_write_bytes(self.heartbeat_path, f"{socket.gethostname()}:{os.getpid()}\n".encode())

    def touch_heartbeat(self) -> None:
        """Mark progress."""
        if self.heartbeat_path.exists():
            os.utime(self.heartbeat_path)
        else:
            self.write_heartbeat()

    def check_no_links(self) -> None:
        """Refuse a run folder that is, or holds, a symbolic link where the suite writes or deletes.

        # CHOSEN: refuse, not follow or replace: a link someone made on purpose (a checkpoints folder
        # on another disk) is not removed behind their back, and nothing outside the run folder is
        # touched; the error says which link and what to do.
        """
        for path in (self.path, *(self.path / name for name in OWN_ENTRIES)):
            if path.is_symlink():
                try:
                    target = os.readlink(path)
                except OSError:
                    target = "?"
                raise DfkdError(f"{path} is a symbolic link (to {target}); a run writes and deletes files only "
                                "inside its own folder: replace the link by a real folder or file (or remove it) "
                                "and run the same command again")

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove the temporary files of writes that a kill interrupted (``.NAME.PID.tmp``); call it
        while holding the run's lock. Returns what was removed."""
        removed = []
        for folder in (self.path, self.checkpoint_dir):
            if folder.is_symlink() or not folder.is_dir():
                continue
            for tmp in folder.glob(".*.tmp"):
                # submitted.json is written by a launcher, which does not hold the run's lock.
                if tmp.name.startswith(".submitted.json.") or not (tmp.is_file() or tmp.is_symlink()):
                    continue
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed.append(tmp)
        return removed

    # ---------------------------------------------------------- lock ---------
    def is_locked(self) -> bool:
        if not self.lock_path.is_file() or self.lock_path.is_symlink():
            return False
        with open(self.lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    return True
                raise
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive ownership of the run while it trains."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.check_no_links()
        try:
            handle = open(os.open(self.lock_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a+")
        except IsADirectoryError:
            raise DfkdError(f"{self.lock_path} is a folder, not the run's lock file; remove it and run the same "
                            "command again") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise DfkdError(f"run {self.name} is already being trained by {owner}; wait for it or stop it")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()}:{os.getpid()}\n")
        handle.flush()
        self.write_heartbeat()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # ------------------------------------------------------------ config -----
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        return read_json_file(self.config_path, "the run's configuration")

    # ----------------------------------------------------------- records -----
    def append_record(self, record: dict[str, Any]) -> None:
        """Append one record (strict JSON: non-finite numbers as null), and its scalars to TensorBoard if enabled."""
        record = strict_json_value(record)
        line = (dumps_strict(record, sort_keys=True, default=float) + "\n").encode()
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, line)  # one write of one whole line
            os.fsync(fd)
        finally:
            os.close(fd)
        if tensorboard_enabled():
            if self._tensorboard is None:
                self._tensorboard = _TensorBoardLog(self.path, purge_step=None)
            self._tensorboard.write(record)
            self._tensorboard.flush()

    def rewrite_records(self, records: list[dict[str, Any]]) -> None:
        """Replace the records file (a resume keeps the records of its checkpoint; a fresh start none).

        With TensorBoard on, a new event file starts with a ``SessionLog.START`` at step 0,
        which makes TensorBoard discard every scalar read so far for this run, and the kept
        records are written again after it: what TensorBoard shows is then exactly the
        records file, with no point of an abandoned attempt left over.
        """
        records = [strict_json_value(r) for r in records]
        data = "".join(dumps_strict(r, sort_keys=True, default=float) + "\n" for r in records)
        atomic_write_bytes(self.records_path, data.encode())
        if tensorboard_enabled():
            # CHOSEN: purge from step 0 and replay, not from the checkpoint's step: drift records are
            # written late with an earlier step (t - tau), so a later purge step would keep old points.
            self.close_tensorboard()
            self._tensorboard = _TensorBoardLog(self.path, purge_step=0)
            for record in records:
                self._tensorboard.write(record)
            self._tensorboard.flush()

    def close_tensorboard(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def read_records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.records_path)

    # -------------------------------------------------------- checkpoints ----
    def _checkpoint_file(self, iteration: int, rank: int, position: tuple[str, int] | None = None) -> Path:
        """``it<N>.rank<r>.pt`` after iteration N; ``it<N>.<phase><steps>.rank<r>.pt`` in the middle of
        iteration N + 1 (a stop request), after ``steps`` optimiser steps of its ``phase``."""
        tag = "" if position is None else f".{position[0]}{int(position[1]):09d}"
        return self.checkpoint_dir / f"it{iteration:08d}{tag}.rank{rank}.pt"

    def _own_folder(self, folder: Path) -> Path:
        """``folder`` of this run, refused if it is a symbolic link (see :meth:`check_no_links`)."""
        if folder.is_symlink() or self.path.is_symlink():
            self.check_no_links()
        return folder

    def samples_folder(self) -> Path:
        """The samples folder, made if needed (never through a symbolic link)."""
        folder = self._own_folder(self.samples_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save_checkpoint_shard(self, state: dict[str, Any], iteration: int, rank: int,
                              position: tuple[str, int] | None = None) -> None:
        import torch

        self._own_folder(self.checkpoint_dir)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self._checkpoint_file(iteration, rank, position), buffer.getvalue(),
                           fault=f"checkpoint_write@{iteration}")

    def commit_checkpoint(self, iteration: int, world_size: int, position: tuple[str, int] | None = None) -> None:
        """Point at the checkpoint of ``iteration`` (all shards written), then drop older ones.
        ``position``: a checkpoint taken in the middle of the next iteration (see :meth:`_checkpoint_file`)."""
        pointer: dict[str, Any] = {"iteration": iteration, "world_size": world_size}
        if position is not None:
            pointer["position"] = [position[0], int(position[1])]
        atomic_write_json(self.pointer_path, pointer)
        keep = {self._checkpoint_file(iteration, r, position).name for r in range(world_size)}
        for old in self._own_folder(self.checkpoint_dir).glob("it*.pt"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, rank: int = 0, world_size: int = 1) -> dict[str, Any] | None:
        if not self.pointer_path.exists():
            return None
        try:
            pointer = json.loads(self.pointer_path.read_text())
            if not isinstance(pointer, dict):
                raise ValueError(f"holds {type(pointer).__name__ if pointer is not None else 'null'}, "
                                 "not an object with an iteration")
            iteration = int(pointer["iteration"])
            position = pointer.get("position")
            if position is not None:
                if not (isinstance(position, list) and len(position) == 2 and isinstance(position[0], str)
                        and re.fullmatch(r"[a-z]{1,32}", position[0]) and isinstance(position[1], int)
                        and not isinstance(position[1], bool) and 0 <= position[1] < 10**9):
                    raise ValueError(f"its position {str(position)[:80]} is not [stage, steps]")
                position = (position[0], position[1])
        except IsADirectoryError:
            raise CheckpointError(f"{self.pointer_path} is a folder, not the run's checkpoint pointer; remove it to "
                                  f"restart run {self.name} from scratch") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            reason = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
            raise CheckpointError(
                f"{self.pointer_path} is damaged ({reason}); delete it to restart run {self.name} from scratch"
            ) from None
        if pointer.get("world_size", 1) != world_size:
            raise CheckpointError(
                f"run {self.name} was checkpointed with {pointer.get('world_size')} processes, now {world_size}; "
                "resume it with the same number of processes"
            )
        import torch

        path = self._checkpoint_file(iteration, rank, position)
        try:
            # Tensors and plain data only: a run folder may be shared, and a planted pickle must not run code.
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is missing; delete {self.pointer_path} to restart the run") from None
        except pickle.UnpicklingError as error:
            if "weights only" not in str(error).lower() and "weights_only" not in str(error).lower():
                raise CheckpointError(f"checkpoint {path} cannot be read (damaged pickle data); delete "
                                      f"{self.pointer_path} to restart the run from scratch") from None
            raise CheckpointError(
                f"checkpoint {path} holds Python objects, not only tensors and plain data, and is not loaded "
                f"(loading it could run code planted in it; the suite never writes such a file); delete "
                f"{self.pointer_path} and the checkpoints folder to restart run {self.name} from scratch"
            ) from None
        except Exception as error:  # torch raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({user_message(error)}); "
                f"delete {self.pointer_path} to restart the run from scratch"
            ) from None

    def mark_submitted(self, job_id: str, launcher: str) -> None:
        atomic_write_json(self.path / "submitted.json", {"job_id": str(job_id), "launcher": launcher,
                                                         "time": time.time()})

    # -------------------------------------------------------------- end ------
    def mark_failed(self, message: str) -> None:
        self.close_tensorboard()
        atomic_write_bytes(self.error_path, (message.rstrip() + "\n").encode())

    def mark_done(self, summary: dict[str, Any]) -> None:
        self.close_tensorboard()
        self.error_path.unlink(missing_ok=True)
        atomic_write_json(self.done_path, summary)
        # Checkpoints are only needed to resume; a finished run keeps its records and weights.
        for shard in self._own_folder(self.checkpoint_dir).glob("it*.pt"):
            shard.unlink(missing_ok=True)
        self.pointer_path.unlink(missing_ok=True)


# ------------------------------------------------------------------ progress ---

@dataclass
class RunProgress:
    """Where a run stands, from its files alone (for ``status`` and ``report``)."""

    status: str  # done, running, failed, incomplete, pending, or damaged (files that cannot be trusted)
    step: int | None  # the iteration reached (records, checkpoint or summary)
    total: int | None  # the planned iterations
    last_accuracy: float | None  # test accuracy of the last evaluation (the final one for a done run)
    rate: float | None  # iterations per second while training (evaluations included)
    eta: float | None  # estimated seconds left, for a running run
    error: str  # the last line of error.txt for a failed run
    damage: str  # what is damaged, for status "damaged"
    records: list[dict[str, Any]]

    def describe(self) -> str:
        """``running, iteration 3,200 of 15,000``, ``stopped at iteration 3,200 of 15,000``, ``failed ...``."""
        where = "?" if self.step is None else f"{self.step:,}"
        of = f" of {self.total:,}" if self.total else ""
        if self.status == "running":
            return f"running, iteration {where}{of}"
        if self.status == "failed":
            return f"failed at iteration {where}{of}" + (f": {self.error}" if self.error else "")
        if self.status == "damaged":
            return self.damage
        if self.status == "done":
            return "done"
        if self.status == "pending":
            return "not started yet"
        return f"stopped at iteration {where}{of}"


def config_mismatch(config: Any, folder_name: str) -> str:
    """What is wrong when a run's ``config.json`` does not hash to its run id (a hand-edited method or
    seed would relabel the run in tables); "" when it matches or cannot be checked (not a run config)."""
    if not isinstance(config, dict) or not {"method", "dataset", "seed", "teacher", "train"} <= set(config):
        return ""
    from dfkd_bench.config import RunConfig

    try:
        computed = RunConfig.from_dict(config).run_id
    except Exception:  # noqa: BLE001 - settings this version cannot rebuild: nothing to compare
        return ""
    stored = config.get("run_id")
    suffix = folder_name.rsplit("-", 1)[-1]
    named = len(suffix) == 12 and all(c in "0123456789abcdef" for c in suffix)
    if (stored is not None and stored != computed) or (named and suffix != computed):
        expected = stored if stored is not None else suffix
        return (f"config.json does not match the run id {expected} (it describes run {computed}: edited by hand?); "
                "restore it, or delete the run folder to run it again")
    return ""


def run_progress(path: Path, now: float | None = None,
                 records: list[dict[str, Any]] | None = None) -> RunProgress:
    """Read a run folder's markers, configuration and records into a :class:`RunProgress`.

    ``records``: the run's records if the caller has read them already (they are not read again).
    """
    path = Path(path)
    store = RunStore(path.parent, path.name)
    now = time.time() if now is None else now
    try:
        status = store.status()
    except OSError as error:  # a marker that is a folder, an unreadable lock ...
        status = "damaged"
        damage = f"cannot read the run's files ({user_message(error)})"
    else:
        damage = ""
    total = None
    try:
        config = store.read_config()
        train = config.get("train") or {}
        total = int(train["epochs"]) * int(train["steps_per_epoch"])
    except DfkdError as error:
        if store.config_path.exists():
            damage = damage or str(error)
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    else:
        damage = damage or config_mismatch(config, path.name)
    if records is None:
        try:
            records = store.read_records()
        except RecordsError as error:
            records = []
            damage = damage or f"records damaged at line {error.line} ({error.reason}) in {error.path}"
        except OSError as error:  # records.jsonl is a folder, or unreadable
            records = []
            damage = damage or f"records cannot be read ({user_message(error)})"
    summary: dict[str, Any] = {}
    if status == "done":
        try:
            summary = store.summary()
        except DfkdError as error:
            damage = damage or str(error)
        if not damage and not store.records_path.exists():
            damage = f"records.jsonl is missing from {path}"
        if not damage and isinstance(summary.get("iterations"), int):
            evals = [r for r in records if r.get("kind") == "eval"]
            last = evals[-1].get("step") if evals else None
            if last != summary["iterations"]:
                # A torn last line (a kill while the final evaluation was written) would otherwise make
                # the previous evaluation pass for the final one.
                damage = (f"its records end with the evaluation at step {last}, not at the final iteration "
                          f"{summary['iterations']} (the last line of {store.records_path} is torn or missing); "
                          "restore it, or delete the run folder to run it again")
    steps = [int(r["step"]) for r in records if isinstance(r.get("step"), (int, float)) and not isinstance(r.get("step"), bool)]
    step = max(steps) if steps else None
    if status == "done" and isinstance(summary.get("iterations"), int):
        step = summary["iterations"]
    elif status != "done":
        try:
            pointer = json.loads(store.pointer_path.read_text())
            step = max(step or 0, int(pointer["iteration"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("test_accuracy"), (int, float))]
    last_accuracy = float(evals[-1]["test_accuracy"]) if evals else summary.get("final_accuracy")
    timed = [(r["step"], r["wall_time"]) for r in records
             if r.get("kind") == "eval" and isinstance(r.get("wall_time"), (int, float))]
    rate = None
    window = timed[-6:]  # the last few evaluations: the current speed, not the set-up's
    if len(window) >= 2 and window[-1][1] > window[0][1] and window[-1][0] > window[0][0]:
        rate = (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1])
    elif summary.get("wall_time") and step:
        rate = step / summary["wall_time"]
    eta = None
    if status == "running" and rate and total and timed:
        since = max(0.0, now - store.records_path.stat().st_mtime) if store.records_path.exists() else 0.0
        eta = max(0.0, (total - timed[-1][0]) / rate - since)
    if damage:
        if status == "done":
            damage = f"done, {damage}"
        status = "damaged"
    return RunProgress(status=status, step=step, total=total, last_accuracy=last_accuracy, rate=rate, eta=eta,
                       error=store.last_error_line() if status == "failed" else "", damage=damage,
                       records=records)
