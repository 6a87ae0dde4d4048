"""Decoding, scoring and the E-step in a helper process, overlapping Kafka polling on another core.

kafka-python unpacks records in Python in the polling thread; in one process that and the
daemon's own work take turns on one core (the GIL).  With a helper process, batch N is
decoded there, scored with a snapshot of the model taken after the daemon learned batch N-1
(``ScoringModel``: the very model the daemon would score it with), and summarised as the EM
statistics of its rows, split by the threshold of that moment (``split_statistics``), while
the daemon polls batch N+1.  The daemon then decides, learns the statistics and produces:
per message it only reads the scores.

The values and their lengths go over in shared memory (a memfd, where the system has one;
else over the socket), the model snapshot and the results over a socket pair.

The helper holds no state (the models stay in the daemon), so losing it loses nothing: the
daemon then does the work in-process.  It ignores SIGINT/SIGTERM (a stop signal sent to
the whole process group is the daemon's to handle) and exits when the daemon closes the
socket between them, or dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

import numpy as np

from .config import InputConfig
from ..detection.decode import TEXT_FORMATS, DecodedBatch, Decoder
from ..mixture.online import ScoredBatch, ScoringModel, split_statistics
from ..detection.threshold import flags_below

log = logging.getLogger(__name__)

_NULL = -1  # the length that stands for a null value (split_packed reads any negative one so)


def pack(batches: list[list[bytes | None]]) -> tuple[bytes, bytes]:
    """Values of several batches as one buffer and their lengths (cheaper than pickling a list)."""
    values = batches[0] if len(batches) == 1 else [value for batch in batches for value in batch]
    try:
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        data = b"".join(values)
    except TypeError:  # a null value
        lengths = np.array([_NULL if v is None else len(v) for v in values], dtype=np.int64)
        data = b"".join(v for v in values if v is not None)
    sizes = [len(batch) for batch in batches]
    return data, np.concatenate((np.array([len(batches), *sizes], dtype=np.int64), lengths)).tobytes()


def unpack_packed(data: bytes, header: bytes) -> list[tuple[bytes, np.ndarray]]:
    """Per batch packed by ``pack``: its values back to back, and their lengths (-1: null)."""
    numbers = np.frombuffer(header, dtype=np.int64)
    n_batches = int(numbers[0])
    sizes, lengths = numbers[1 : 1 + n_batches], numbers[1 + n_batches :]
    ends = np.concatenate(([0], np.cumsum(np.maximum(lengths, 0)))).tolist()
    out, at = [], 0
    for size in sizes.tolist():
        out.append((data[ends[at] : ends[at + size]], lengths[at : at + size]))
        at += size
    return out


# What the helper scores a batch with: the model as it stands and the threshold's value.
Scoring = tuple[ScoringModel, float | None]


def _decode_and_score(decoder: Decoder, packed: tuple[bytes, np.ndarray], scoring: Scoring | None,
                      return_decoded: bool) -> tuple[DecodedBatch | None, ScoredBatch | None]:
    """Decode a batch; score its valid rows and compute what the model learns from them.

    The scores go back with the statistics only (not the rows' responsibilities): the model
    learns from those, and the transfer stays small.  Decoded rows go back only if
    ``return_decoded`` (text formats; raw bytes are cheaper to decode again than to send).
    """
    decoded = decoder.decode_packed(*packed)
    scored = None
    if scoring is not None and len(decoded.X):
        model, threshold = scoring
        full = model.score(decoded.X)
        statistics = split_statistics(full, flags_below(full.log_density, threshold), model.covariance_type)
        scored = ScoredBatch(None, full.log_density, None, full.component, full.model_version, statistics, threshold)
    return (decoded if return_decoded else None), scored


class SharedBuffer:
    """A batch's values, handed to the helper in memory both processes map (a memfd).

    Writing several MB into a socket whose buffer holds ~200 KB makes the daemon wait for the
    helper to be scheduled, chunk after chunk (4 ms a 16,000-message JSON batch, measured).
    Here it is one copy.  It grows to the largest batch (about 6 MB for 20,000 JSON messages
    of 16 numbers); the helper maps it again when it has grown.
    One batch at a time: the daemon writes the next only after the helper has answered.
    """

    def __init__(self, fd: int | None = None):
        self.fd = os.memfd_create("streamgmm-batch", os.MFD_CLOEXEC) if fd is None else fd
        self._map: mmap.mmap | None = None

    def write(self, *parts: bytes) -> None:
        """Write the parts back to back from the start."""
        total = sum(map(len, parts))
        if self._map is None or len(self._map) < total:
            size = max(total, 2 * len(self._map) if self._map is not None else 1 << 20)
            os.ftruncate(self.fd, size)
            self._remap(size)
        at = 0
        for part in parts:
            self._map[at : at + len(part)] = part
            at += len(part)

    def read(self, start: int, stop: int) -> bytes:
        if self._map is None or len(self._map) < stop:
            self._remap(os.fstat(self.fd).st_size)
        return self._map[start:stop]

    def _remap(self, size: int) -> None:
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self.fd, size)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self.fd)


def _serve(connection, config: InputConfig, shared: SharedBuffer | None) -> None:
    """The helper's loop: (buffer, lengths, scorings) in, (DecodedBatch | None, ScoredBatch | None)
    per batch out.  The lengths and the buffer are in ``shared`` (their sizes are sent) or,
    without it, sent too."""
    decoder = Decoder(config)
    return_decoded = config.format in TEXT_FORMATS
    while True:
        try:
            (header_size, data_size), scorings = connection.recv()
            if shared is None:
                header, data = connection.recv_bytes(), connection.recv_bytes()
            else:
                header = shared.read(0, header_size)
                data = shared.read(header_size, header_size + data_size)
        except (EOFError, OSError):
            return
        connection.send([_decode_and_score(decoder, packed, scoring, return_decoded)
                         for packed, scoring in zip(unpack_packed(data, header), scorings)])


class DecoderProcess:
    """One helper process; one request outstanding at a time (``submit`` then ``results``)."""

    def __init__(self, config: InputConfig, shared_memory: bool = True):
        # A fresh interpreter (not fork: the daemon has client threads; not multiprocessing's
        # spawn, which re-imports the caller's __main__), talking over a socket pair.
        ours, theirs = socket.socketpair()
        # Where the system has memfd (Linux), the batches go through shared memory.
        self._shared = None
        if shared_memory and hasattr(os, "memfd_create"):
            try:
                self._shared = SharedBuffer()
            except OSError as exc:  # a sandbox that refuses it: the socket works too, a little slower
                log.warning("no shared memory for the decoder process (%s); sending batches over its socket",
                            exc)
        shared_fd = -1 if self._shared is None else self._shared.fd
        # The helper is the daemon's second core: one BLAS thread, unless the operator says
        # otherwise (several would spin against the daemon: measured 5.8 vs 2.7 us CPU a message).
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), json.dumps(dataclasses.asdict(config)),
             str(shared_fd)],
            pass_fds=[theirs.fileno()] + ([] if self._shared is None else [shared_fd]),
            env=env,
        )
        theirs.close()
        self._connection = Connection(ours.detach())
        self._outstanding = False
        self.alive = True

    def submit(self, batches: list[list[bytes | None]], scorings: list[Scoring | None] | None = None) -> None:
        """Start decoding these batches of values, and scoring each with its (model, threshold)
        if given (nothing happens if the helper is gone)."""
        if self._outstanding:
            raise RuntimeError("the previous batch's results were not collected")
        if not self.alive:
            return
        data, header = pack(batches)
        try:
            if self._shared is not None:
                self._shared.write(header, data)
            self._connection.send(((len(header), len(data)), scorings or [None] * len(batches)))
            if self._shared is None:
                self._connection.send_bytes(header)
                self._connection.send_bytes(data)
            self._outstanding = True
        except OSError as exc:
            self._lost(exc)

    def results(self) -> list[tuple[DecodedBatch | None, ScoredBatch | None]] | None:
        """(decoded or None, scored or None) per batch of the last ``submit``; None if the
        helper was lost (decode and score here)."""
        if not self._outstanding:
            return None
        self._outstanding = False
        try:
            return self._connection.recv()
        except (EOFError, OSError) as exc:
            self._lost(exc)
            return None

    def _lost(self, exc) -> None:
        self.alive = False
        self._outstanding = False
        log.error("the decoder process is gone (%s, exit code %s); decoding and scoring in the daemon's "
                  "process from now on", exc, self._process.poll())

    def close(self) -> None:
        self._connection.close()  # the helper sees EOF and returns
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        if self._shared is not None:
            self._shared.close()
            self._shared = None


def main(argv: list[str]) -> None:
    """``python -m streamgmm.decode_process FD CONFIG_JSON SHARED_FD``: the helper, started by
    DecoderProcess (SHARED_FD -1: no shared buffer)."""
    # A stop signal sent to the whole process group is the daemon's to handle; the helper
    # goes when the daemon closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = json.loads(argv[1])
    if settings.get("fields") is not None:
        settings["fields"] = tuple(settings["fields"])
    shared_fd = int(argv[2])
    shared = None if shared_fd < 0 else SharedBuffer(shared_fd)
    _serve(Connection(int(argv[0])), InputConfig(**settings), shared)


if __name__ == "__main__":
    main(sys.argv[1:])
