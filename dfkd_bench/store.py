"""Run folders: configuration, records, checkpoints and markers, written safely.

One folder per run, named by the run's configuration hash::

    <results_dir>/<method>-<dataset>-<student>-s<seed>-<hash>/
        config.json        resolved configuration, versions, git commit, device
        records.jsonl      append-only: one JSON object per evaluation / drift / sample event
        checkpoint.json    pointer to the newest complete checkpoint
        checkpoints/       it<N>.rank<r>.pt, everything needed to resume exactly
        samples/           PNG sample grids
        student.pt         final student weights (state_dict)
        error.txt          the last error of a failed attempt
        heartbeat          touched while the run makes progress
        done               written last; holds the final summary

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

import contextlib
import errno
import fcntl
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dfkd_bench.errors import CheckpointError, DfkdError

HEARTBEAT_STALE_SECONDS = 15 * 60
DEFAULT_RESULTS_DIR = "results/runs"


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn (unparsable) last line from a kill is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise DfkdError(f"{path}: line {number + 1} is not valid JSON; the records file is damaged")
    return records


class RunStore:
    """The files of one run."""

    def __init__(self, results_dir: str | os.PathLike, run_name: str):
        self.path = Path(results_dir) / run_name
        self.name = run_name

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
        return json.loads(self.done_path.read_text())

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
        if not self.error_path.exists():
            return ""
        lines = [line for line in self.error_path.read_text().splitlines() if line.strip()]
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

    # ---------------------------------------------------------- lock ---------
    def is_locked(self) -> bool:
        if not self.lock_path.exists():
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
        handle = open(self.lock_path, "a+")
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
        return json.loads(self.config_path.read_text())

    # ----------------------------------------------------------- records -----
    def append_record(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, default=float) + "\n").encode()
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one whole line
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite_records(self, records: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, sort_keys=True, default=float) + "\n" for r in records)
        atomic_write_bytes(self.records_path, data.encode())

    def read_records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.records_path)

    # -------------------------------------------------------- checkpoints ----
    def _checkpoint_file(self, iteration: int, rank: int) -> Path:
        return self.checkpoint_dir / f"it{iteration:08d}.rank{rank}.pt"

    def save_checkpoint_shard(self, state: dict[str, Any], iteration: int, rank: int) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self._checkpoint_file(iteration, rank), buffer.getvalue())

    def commit_checkpoint(self, iteration: int, world_size: int) -> None:
        """Point at the checkpoint of ``iteration`` (all shards written), then drop older ones."""
        atomic_write_json(self.pointer_path, {"iteration": iteration, "world_size": world_size})
        keep = {self._checkpoint_file(iteration, r).name for r in range(world_size)}
        for old in self.checkpoint_dir.glob("it*.pt"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, rank: int = 0, world_size: int = 1) -> dict[str, Any] | None:
        if not self.pointer_path.exists():
            return None
        try:
            pointer = json.loads(self.pointer_path.read_text())
            iteration = int(pointer["iteration"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(
                f"{self.pointer_path} is damaged ({error}); delete it to restart run {self.name} from scratch"
            ) from None
        if pointer.get("world_size", 1) != world_size:
            raise CheckpointError(
                f"run {self.name} was checkpointed with {pointer.get('world_size')} processes, now {world_size}; "
                "resume it with the same number of processes"
            )
        import torch

        path = self._checkpoint_file(iteration, rank)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is missing; delete {self.pointer_path} to restart the run") from None
        except Exception as error:  # torch raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0]}); "
                f"delete {self.pointer_path} to restart the run from scratch"
            ) from None

    def mark_submitted(self, job_id: str, launcher: str) -> None:
        atomic_write_json(self.path / "submitted.json", {"job_id": str(job_id), "launcher": launcher,
                                                         "time": time.time()})

    # -------------------------------------------------------------- end ------
    def mark_failed(self, message: str) -> None:
        atomic_write_bytes(self.error_path, (message.rstrip() + "\n").encode())

    def mark_done(self, summary: dict[str, Any]) -> None:
        self.error_path.unlink(missing_ok=True)
        atomic_write_json(self.done_path, summary)
        # Checkpoints are only needed to resume; a finished run keeps its records and weights.
        for shard in self.checkpoint_dir.glob("it*.pt"):
            shard.unlink(missing_ok=True)
        self.pointer_path.unlink(missing_ok=True)
