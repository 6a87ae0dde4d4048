"""Where model state lives: the checkpoint format, files in checkpoint.dir, records in a topic.

A checkpoint is versioned, checksummed and atomically written; the newest valid one wins.

File layout (never pickled)::

    STREAMGMM-CHECKPOINT\\n
    {"format_version": 2, "payload_bytes": N, "sha256": "..."}\\n
    <N bytes: an .npz holding the arrays and one JSON document for everything else>

A write goes to a temporary file, is fsynced, renamed over, and the directory fsynced, so a
crash leaves either the old set of checkpoints or the old set plus a complete new one.  A torn
or corrupted file fails its checksum on load and the previous checkpoint is used, loudly.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
import zipfile
import zlib
from collections import deque
from pathlib import Path

import numpy as np
from confluent_kafka import KafkaError, KafkaException

from .kafka import DEFAULT_MESSAGE_MAX_BYTES, flush_in_steps, read_topic

from ..mixture._atomic import write_atomically

log = logging.getLogger(__name__)

MAGIC = b"STREAMGMM-CHECKPOINT\n"
# Version 2: the threshold's history is relative to the model's typical log-density (fifth
# session).  Read back by a version-1 reader it was off by that level, and the next 1,000 points
# got 505 flags for 60 (helper-42): such a reader refuses version 2, and falls back to an older
# checkpoint or starts afresh, saying so.  This reader takes both (a version-1 history is made
# relative when restored).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
FILE_PATTERN = re.compile(r"^checkpoint-(\d{12})\.sgmm$")
# ... and those set aside (see Checkpointer.withdraw_uncommitted): numbered in the same sequence.
NUMBERED = re.compile(r"^checkpoint-(\d{12})\.sgmm(\.withdrawn)?$")
# Fault injection for the crash tests: hold every write between the temporary file and the
# rename for this long, so a SIGKILL can land in the middle of a checkpoint. Never set it
# in production.
FAULT_PAUSE_ENV = "STREAMGMM_FAULT_CHECKPOINT_PAUSE_SECONDS"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class CheckpointSpaceError(CheckpointError):
    """No space left for checkpoints (the disk or the quota is full): it passes."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the errors of a full disk or quota (CheckpointSpaceError)


# --------------------------------------------------------------- (de)serialising
def pack(state: dict) -> bytes:
    """A nested dict of JSON values and numpy arrays as checkpoint file bytes."""
    arrays: dict[str, np.ndarray] = {}

    def strip(value, path):
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise CheckpointError(f"{path} is an object array; refusing to checkpoint it")
            arrays[path] = value
            return {"__ndarray__": path}
        if isinstance(value, dict):
            return {str(k): strip(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strip(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value

    document = strip(state, "")
    arrays["__document__"] = np.frombuffer(json.dumps(document, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    header = {"format_version": FORMAT_VERSION, "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def unpack(data: bytes, source: str = "checkpoint") -> dict:
    """Inverse of ``pack``; raises CheckpointError saying what is wrong."""
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{source} is not a streamgmm checkpoint (bad magic)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CheckpointError(f"{source} is truncated inside its header")
    try:
        header = json.loads(data[len(MAGIC):end])
    except ValueError:
        raise CheckpointError(f"{source} has a corrupt header") from None
    version = header.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{source} has format version {version!r}; this streamgmm reads versions 1 and {FORMAT_VERSION}. "
            "Start from an empty checkpoint.dir or use the streamgmm release that wrote it"
        )
    payload = data[end + 1:]
    if len(payload) != header.get("payload_bytes"):
        raise CheckpointError(f"{source} is truncated: {len(payload)} of {header.get('payload_bytes')} payload bytes")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{source} fails its checksum (corrupted on disk)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {key: np.array(npz[key]) for key in npz.files}
        document = json.loads(bytes(arrays.pop("__document__")).decode())
    # (BadZipFile, EOFError, zlib.error: a payload with a valid checksum that is not an archive
    # stopped every member its partition went to; helper-82.)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"{source} payload is unreadable: {exc}") from None

    def restore(value):
        if isinstance(value, dict):
            if set(value) == {"__ndarray__"}:
                return arrays[value["__ndarray__"]]
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    try:
        state = restore(document)
    except (KeyError, TypeError) as exc:  # an array the document names and the payload lacks
        raise CheckpointError(f"{source} payload is unreadable: array {exc} missing") from None
    if isinstance(state, dict):
        state["checkpoint_format"] = version  # what it was read from (inspect says it)
    return state


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """The state in one checkpoint file; CheckpointError saying why not (unreadable, damaged)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    return unpack(data, str(path))


# ------------------------------------------------------------------------ store
class CheckpointStore:
    """Numbered checkpoint files in one directory; keeps the newest ``keep``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self.skipped = 0  # files the last load_latest skipped

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return self._listing()[0]

    def _listing(self) -> tuple[list[Path], list[Path]]:
        """(checkpoint files, withdrawn ones), each oldest first, in one look at the directory."""
        if not self.directory.is_dir():
            return [], []
        found = sorted((int(m.group(1)), bool(m.group(2)), p) for p in self.directory.iterdir()
                       if (m := NUMBERED.match(p.name)))
        return [p for _, withdrawn, p in found if not withdrawn], [p for _, withdrawn, p in found if withdrawn]

    def write(self, state: dict, protect: frozenset = frozenset()) -> Path:
        """Write atomically; returns the new file's path. Raises CheckpointError on failure.
        ``protect``: files pruning leaves however old (the newest one the group committed, those
        whose commit it may have taken)."""
        data = pack(state)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            files, withdrawn = self._listing()
            # Past withdrawn ones too: a number used again renamed the next withdrawn file over the
            # first (helper-85).
            numbered = [p.name for p in files[-1:] + withdrawn[-1:]]
            sequence = max((int(NUMBERED.match(name).group(1)) for name in numbered), default=0) + 1
            path = write_atomically(self.directory / f"checkpoint-{sequence:012d}.sgmm", data, self._fault_pause)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint in {self.directory}: {exc.strerror or exc}") from None
        # Withdrawn files too, the newest `keep` of them left to inspect (they piled up, one a
        # refused commit; helper-87).
        files.append(path)
        for old in [p for p in files[: -self.keep] if p not in protect] + withdrawn[: -self.keep]:
            try:
                old.unlink()
            except OSError as exc:  # pruning is best effort; the next write tries again
                log.warning("cannot remove old checkpoint %s: %s", old, exc.strerror)
        return path

    def newest_valid(self, restore_problem=None) -> tuple[tuple[dict, Path] | None, list[tuple[Path, str]]]:
        """(state, path) of the newest checkpoint that reads back intact and that
        ``restore_problem(state)`` (why it cannot be restored, or None) does not refuse (None if
        there is none), and each newer one that was passed over, with why (they are kept for
        inspection).  When every intact one is refused, the newest of them is returned, for its
        restore to say why (a config change refuses them all)."""
        skipped, refused = [], None
        for path in reversed(self.paths()):
            try:
                state = read_checkpoint_file(path)
            except CheckpointError as exc:
                skipped.append((path, str(exc)))
                continue
            why = None if restore_problem is None else restore_problem(state)
            if why is None:
                return (state, path), skipped
            refused = refused or ((state, path), len(skipped))
            skipped.append((path, f"it cannot be restored ({why})"))
        if refused is not None:
            found, passed = refused
            return found, skipped[:passed]
        return None, skipped

    def load_latest(self, restore_problem=None) -> tuple[dict, Path] | None:
        """The newest checkpoint that reads back intact (and restores, see ``newest_valid``), or
        None; each one skipped is an error in the log."""
        found, skipped = self.newest_valid(restore_problem)
        self.skipped = len(skipped)
        for n, (path, why) in enumerate(skipped, 1):
            older = found is not None or n < len(skipped)
            then = "falling back to the previous one" if older else "there is no older one"
            log.error("skipping checkpoint %s: %s; %s", path, why, then)
        return found

    @staticmethod
    def _fault_pause(tmp: Path) -> None:
        pause = float(os.environ.get(FAULT_PAUSE_ENV, "0") or 0)
        if pause > 0:
            log.warning("fault injection: checkpoint %s written but not renamed; pausing %.2f s", tmp.name, pause)
            time.sleep(pause)


# ------------------------------------------------------------------- per model key
GLOBAL_KEY = "global"
# A corrupt newest state record falls back to the one before, up to this many of a key.
STATE_RECORDS_TRIED = 10


def model_key(scope: str, topic: str, partition: int) -> str:
    """The model a partition's messages go to: "global", or "topic/partition"."""
    return GLOBAL_KEY if scope == "global" else f"{topic}/{partition}"


def initial_state(init_from: str) -> tuple[dict, Path]:
    """The newest valid checkpoint in ``init_from`` (model.init_from, e.g. written by ``streamgmm
    fit``) as a state to start from: its model and threshold, with counters and offsets anew.
    CheckpointError when there is none."""
    where = Path(init_from)
    if not where.exists():
        raise CheckpointError(f"model.init_from={init_from} does not exist; write a checkpoint there with "
                              "`streamgmm fit`, fix the path, or set model.init_from: null")
    if where.is_file():  # a checkpoint file itself, as `streamgmm inspect` takes
        state, path = read_checkpoint_file(where), where
    else:
        found = CheckpointStore(init_from).load_latest()
        if found is None:
            raise CheckpointError(f"model.init_from={init_from}: no valid checkpoint there; write one with "
                                  "`streamgmm fit` or set model.init_from: null")
        state, path = found
    return {**state, "offsets": {}, "counters": {k: 0 for k in state["counters"]}}, path


class LocalStateStore:
    """Numbered checkpoint files in ``checkpoint.dir`` (``global``) or one sub-directory per
    partition model."""

    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = Path(directory)
        self.keep = keep
        self.skipped = 0  # checkpoint files the last load skipped (they did not read back intact)
        self.restored: dict = {}  # per model key, the file the last load took
        self._lock = None  # the open, locked .lock (see lock); closed: lost, to be taken again

    def store_for(self, key: str) -> CheckpointStore:
        # The global model keeps the top-level directory, as single-instance deployments expect.
        name = re.sub(r"[^A-Za-z0-9._-]", "_", key.replace("/", "-"))
        return CheckpointStore(self.directory if key == GLOBAL_KEY else self.directory / "partitions" / name, self.keep)

    def write(self, key: str, state: dict, protect: frozenset = frozenset()) -> Path:
        self._keep_lock()
        return self.store_for(key).write(state, protect)

    def _keep_lock(self) -> None:
        """Lock again when the locked .lock is no longer the directory's: the directory removed while
        the daemon ran was made again by the next write, without a lock, and a second daemon
        started on it was not refused (helper-39: both learned the same messages)."""
        held = self._lock
        if held is None:
            return  # never locked (a file system without locks, or not asked to)
        if not held.closed:
            try:
                current = os.stat(self.directory / ".lock")
                if (current.st_dev, current.st_ino) == (os.fstat(held.fileno()).st_dev, os.fstat(held.fileno()).st_ino):
                    return
            except OSError:  # gone, or the directory is now a file or unreadable: lock again
                pass
            log.warning("checkpoint.dir %s lost its .lock while running (removed?): locking it again", self.directory)
            held.close()
        # Until a lock is held again every write is refused (a closed handle stays as the
        # marker): a second try after another daemon took the directory wrote into it (helper-42).
        self.lock()  # CheckpointError if another daemon holds it now, or it cannot be made

    def load(self, key: str, restore_problem=None) -> dict | None:
        """The newest intact checkpoint of ``key`` that ``restore_problem`` does not refuse
        (see ``CheckpointStore.newest_valid``)."""
        store = self.store_for(key)
        found = store.load_latest(restore_problem)
        self.skipped = store.skipped
        self.restored[key] = None if found is None else found[1]  # (which file: the newest may be unreadable)
        if found is None and store.skipped:
            log.error("no checkpoint of %s in %s reads back intact: its model starts afresh with a new warm-up, "
                      "from the group's commit (what the lost checkpoints had learned is not learned again); "
                      "`streamgmm inspect %s` shows each file", key, store.directory, store.directory)
        return None if found is None else found[0]

    def lock(self) -> None:
        """Hold an exclusive lock on the directory for the life of the process (CheckpointError if
        another process holds it).  Two daemons on one directory overwrote each other's files
        through the same temporary names and pruned each other's checkpoints, and a restart then
        took whichever model was newest (helper-35: another pipeline's)."""
        path = self.directory / ".lock"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as exc:  # a .lock left by another user (a first run as root, then 10001)
            if exc.errno in NO_SPACE:  # (a new directory, or no inode left)
                raise CheckpointSpaceError(f"cannot make {path}: {exc.strerror}; free space on its disk or point "
                                           "checkpoint.dir elsewhere") from None
            raise CheckpointError(f"cannot open {path}: {exc.strerror or exc}; give the daemon's user the directory "
                                  f"and its files (chown -R) or point checkpoint.dir elsewhere") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A file system without locks (NFS without lockd, some FUSE mounts): not "in use".
                handle.close()
                log.warning("cannot lock checkpoint.dir %s (%s): a second daemon on it would not be refused",
                            self.directory, exc.strerror or exc)
                self._lock = None
                return
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(f"checkpoint.dir {self.directory} is in use by {holder}: give each daemon its own "
                                  "checkpoint.dir (the members of a group too, with model.scope: global)") from None
        try:  # who holds it, for the next one refused: the lock is the flock, not these words
            handle.seek(0)
            handle.truncate()
            handle.write(f"streamgmm pid {os.getpid()} on {socket.gethostname()}\n")  # (in a container: its id)
            handle.flush()
        except OSError as exc:  # a full disk (a start while it is full goes on: see check_writable)
            log.warning("cannot write who holds %s (%s)", path, exc.strerror or exc)
        self._lock = handle  # released when the process ends, however it ends

    def check_writable(self) -> None:
        """Raise CheckpointError unless a file can be created in the directory (checked at start:
        a daemon that can never checkpoint must not run); CheckpointSpaceError when the disk or
        the quota is full, which passes (the daemon starts and retries its checkpoints)."""
        probe = self.directory / f".streamgmm-write-test-{os.getpid()}"  # two starting at once: a probe each
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            if exc.errno in NO_SPACE:
                where = "its disk" if exc.errno == errno.ENOSPC else "its quota"
                raise CheckpointSpaceError(f"checkpoint.dir {self.directory} has no space left: {exc.strerror}; "
                                           f"free space on {where} or point checkpoint.dir elsewhere") from None
            # /proc and read-only mounts said "fix its permissions" (helper-52): the same words as check-config.
            why = writable_without_writing(self.directory)
            if why is None:
                mend = "mount it read-write" if exc.errno == errno.EROFS else "fix its permissions"
                why = (f"checkpoint.dir {self.directory} is not writable: {exc.strerror or exc}; {mend} or point "
                       "checkpoint.dir elsewhere")
            raise CheckpointError(why) from None


def writable_without_writing(directory: str | os.PathLike) -> str | None:
    """Why a daemon could not write checkpoints in ``directory`` (None: it could), found without
    creating anything (``check-config`` may run as another user than the daemon)."""
    path = Path(directory)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"checkpoint.dir {directory} is not writable: {existing} is not a directory; point checkpoint.dir elsewhere"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"checkpoint.dir {directory} is not writable by this user ({existing}: permission denied); "
                "fix its permissions or point checkpoint.dir elsewhere")
    try:
        filesystem = os.statvfs(existing)
    except OSError:
        return None  # not known here: the daemon's own write test decides
    if filesystem.f_blocks == 0:
        # proc, sysfs, cgroup: access() lets root "write" there, yet no file can be made
        # (checkpoint.dir=/proc/x: check-config said ok, run refused it; helper-48).
        return (f"checkpoint.dir {directory} is not writable: {existing} is on a filesystem with no space for "
                "files (such as /proc or /sys); point checkpoint.dir elsewhere")
    if filesystem.f_flag & os.ST_RDONLY:
        return (f"checkpoint.dir {directory} is not writable: {existing} is mounted read-only; mount it read-write "
                "or point checkpoint.dir elsewhere")
    return None


class TopicStateStore:
    """Checkpoints as records of a Kafka topic (one per model key, newest wins), holding the
    same versioned, checksummed bytes as the files, so any instance of the consumer group can
    restore a partition's model when the partition moves to it.

    Reads scan the whole topic: a broker need not compact (Tansu keeps every record).
    """

    def __init__(self, topic: str, settings: dict, producer, max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
                 read_max_seconds: float | None = None):
        self.topic = topic
        self.settings = settings
        self.read_max_seconds = read_max_seconds  # a read in a rebalance callback must end (see read_topic)
        self.producer = producer  # a confluent_kafka.Producer of its own: its deliveries are the store's
        self.max_bytes = max_bytes  # the producer's message.max.bytes, for the error that names it
        self.failed: list[str] = []
        self._foreign_said = False  # keys of another program's records were logged

    def write(self, key: str, state: dict) -> None:
        """Send one state record; CheckpointError at once if it is over the producer's limit."""
        value = pack(state)

        def delivered(error, _message):
            if error is None:
                return
            if error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                self.failed.append(f"{key}: the broker refused a {len(value):,}-byte record as too large: raise "
                                   f"the max.message.bytes of topic {self.topic} (or the brokers' message.max.bytes)")
            else:
                self.failed.append(f"{key}: {error.str()}")

        try:
            self.producer.produce(self.topic, key=key.encode(), value=value, on_delivery=delivered)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            raise CheckpointError(
                f"the state record of {key} is {len(value):,} bytes, more than the producer's message.max.bytes "
                f"({self.max_bytes:,}) allows: raise kafka.producer.message.max.bytes (and the max.message.bytes "
                f"of topic {self.topic} to match), or make the model smaller (model.max_components, "
                "model.covariance_type)") from None

    def flush(self, timeout: float, give_up=None) -> None:
        """Wait for the records written; CheckpointError unless every one was acknowledged
        (``give_up()``: a stop that has waited long enough, see ``kafka.flush_in_steps``)."""
        started = time.monotonic()
        pending = flush_in_steps(self.producer, timeout, give_up)
        failed, self.failed = self.failed, []
        if pending or failed:
            raise CheckpointError(f"state topic {self.topic}: {pending} record(s) unacknowledged after "
                                  f"{time.monotonic() - started:.0f} s, {len(failed)} failed {failed[:3]}")

    def load_many(self, keys=None, timeout: float = 30.0, floors: dict | None = None,
                  restore_problem=None) -> dict[str, dict]:
        """The newest readable state per key (every key when ``keys`` is None); a corrupt newest
        record falls back to the one before, and so does one that ``restore_problem(state)``
        (why it cannot be restored, or None) refuses: a record with a valid checksum but content
        this streamgmm cannot take stopped every member the partition went to (helper-53).  When
        no record is taken, the newest refused one is returned, for its restore to say why (a
        config change refuses them all).

        ``floors``: {key: {(topic, partition): the group's committed offset}}.  A record behind
        the commit of one of its partitions is passed over for an older one at or past it: a
        member that had lost the partition without knowing (stopped past its session timeout)
        can write one more record after the new owner's, and restoring it would drop what the
        new owner learned up to its commit.  Only if none of the last few reaches the commit (an
        operator moved it ahead) is the newest taken."""
        wanted = None if keys is None else set(keys)
        values: dict[str, deque[bytes]] = {}
        for message in read_topic(self.settings, self.topic, timeout, self.read_max_seconds):
            if message.key() is not None and message.value() is not None:
                # errors="replace": another program's key that is not UTF-8 held every partition
                # paused for good, taken for a topic unreadable as a whole (helper-82).
                key = message.key().decode(errors="replace")
                if wanted is None or key in wanted:  # the newest few of each: the topic may hold thousands
                    values.setdefault(key, deque(maxlen=STATE_RECORDS_TRIED)).append(message.value())
        found, foreign = {}, []
        for key in sorted(values) if keys is None else keys:
            state, ours = self._pick(key, values.get(key, ()), (floors or {}).get(key, {}), restore_problem,
                                     scan=keys is None)
            if state is not None:
                found[key] = state
            elif not ours:
                foreign.append(key)
        if foreign and not self._foreign_said:  # (once: `inspect --group` reads the topic twice)
            self._foreign_said = True
            log.warning("topic %s: %d key(s) hold no streamgmm state, only records of another program (%s%s): left "
                        "out", self.topic, len(foreign), ", ".join(foreign[:5]), ", ..." if len(foreign) > 5 else "")
        return found

    def _pick(self, key: str, values, floor: dict, restore_problem, scan: bool) -> tuple[dict | None, bool]:
        """The record of ``key`` to restore from its newest few ``values`` (see ``load_many``),
        or None, and whether any of them is streamgmm's (in a ``scan`` of every key, another
        program's records are left out without an ERROR each)."""
        passed_over, newest, refused, ours = 0, None, [], not scan
        for value in reversed(values):
            if scan and not value.startswith(MAGIC):
                continue
            ours = True
            try:
                state = unpack(value, f"{self.topic} record {key}")
            except CheckpointError as exc:
                log.error("skipping state record %s: %s; trying the previous one", key, exc)
                continue
            why = None if restore_problem is None else restore_problem(state)
            if why is not None:
                refused.append((state, why))  # said below if an older one is taken; else its restore says it
                continue
            if not _reaches(state, floor):
                passed_over, newest = passed_over + 1, state if newest is None else newest
                continue
            if passed_over:
                log.warning("state %s: passing over %d newer record(s) behind the group's commit %s (written by a "
                            "member that had lost the partition without knowing); restoring the one at offsets %s",
                            key, passed_over, {f"{t}/{p}": o for (t, p), o in floor.items()}, state["offsets"])
            self._said_refused(key, refused)
            return state, ours
        if newest is not None:  # none reaches the commit: the newest, resumed at the commit
            self._said_refused(key, refused)
            return newest, ours
        return (refused[0][0] if refused else None), ours  # none restores: the newest says why

    @staticmethod
    def _said_refused(key: str, refused: list[tuple[dict, str]]) -> None:
        if refused:
            log.error("state %s: passing over %d newer record(s) that cannot be restored (%s); restoring an older "
                      "one", key, len(refused), refused[0][1])


def _reaches(state: dict, floor: dict) -> bool:
    """Whether the state's offsets are at or past ``floor`` ({(topic, partition): offset}) on
    every partition it names."""
    try:
        offsets = state.get("offsets") or {}
        return all(offsets.get(topic, {}).get(str(partition), -1) >= offset for (topic, partition), offset in floor.items())
    except (AttributeError, TypeError):
        return True  # malformed: taken, so that restoring it says what is wrong
