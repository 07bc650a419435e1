"""On a CPU host, an encoder starts a batch between the decoder's chunk-carrying steps, not
during one.

With XLA's CPU backend the encoder and decoder replicas compute on the same cores, and a
step that overlaps an encode takes about twice as long. Before each step the decoder halves
its prompt chunk when it sees the encoder computing (decoder_service/graph_times.py), but an
encode that begins after a step began is not seen: a step carrying a 128-token chunk beside
a full batch of decodes (~250 ms alone) then stalls every stream for ~550 ms. Those steps made
the p99 of the inter-token gaps with every image new (docs/benchmarks.md, Issue 13: 6.68x the
median in the 22:10 run). So the decoder holds this gate through each step that carries a
chunk beside decodes, and the encoder waits for it before a batch: the step runs alone, and
the next one sees the encoder and halves its chunk. Measured, five alternated pairs: ITL p99 /
median 3.61x against 4.76x, a new image's first token 5 % later.

A `flock` on a file per host: the decoders hold it shared (several decoder replicas on one
host do not wait for each other), and an encoder asks for it exclusively, polling, for at most
`max_wait_s`: a shared lock that some decoder always holds would otherwise keep it out. It
releases it at once and computes; nothing waits for the encoder.

The encoder also announces each batch, from before its wait until it is computed (a second
`flock`, held shared by encoders; `encoder_busy` tries it exclusively). Without that, the
step after the one it waited for starts just as the encode does, sees nothing yet, and carries
a whole chunk beside the encode: the overlap the gate is for. The decoder's scheduler sizes
its steps for an announced batch (a halved chunk, once half the decode batch runs;
decoder_service/scheduler.py), and such a step does not hold the gate: the encoder then waits
only for the step in flight. Measured, every image new: ITL p99 / median 3.72x (3.65-3.81)
against 4.20x (3.06-5.73) with the gate alone, throughput +6 %, the image pool +3 %
(docs/benchmarks.md, Issue 13).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DEFAULT_PATH = os.path.join(tempfile.gettempdir(), "splitserve-chunk-steps")


class ChunkStepGate:
    def __init__(self, path: str = DEFAULT_PATH, *, max_wait_s: float = 0.5, poll_s: float = 0.002,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
        # Held (shared) by encoders from before their wait until their batch is computed.
        self._encoding_fd = os.open(path + ".encoding", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self._clock = clock
        self.waited_s = 0.0  # the encoder's total wait, for its stats

    @contextmanager
    def chunk_step(self) -> Iterator[None]:
        """The decoder's side: held (shared) through a step carrying a chunk beside decodes."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def wait_for_gap(self) -> float:
        """The encoder's side: returns once no decoder is in a chunk-carrying step, or after
        `max_wait_s`; returns the seconds waited."""
        start = self._clock()
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if self._clock() - start >= self.max_wait_s:
                    break
                time.sleep(self.poll_s)
                continue
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            break
        waited = self._clock() - start
        self.waited_s += waited
        return waited

    @contextmanager
    def encoding(self) -> Iterator[None]:
        """The encoder's side: around a whole batch. Announces it, so that the decoders' next
        steps are sized for shared cores and do not hold the gate; waits for the chunk step in
        flight (`wait_for_gap`); then the batch computes."""
        fcntl.flock(self._encoding_fd, fcntl.LOCK_SH)
        try:
            self.wait_for_gap()
            yield
        finally:
            fcntl.flock(self._encoding_fd, fcntl.LOCK_UN)

    def encoder_busy(self) -> bool:
        """The decoder's side: an encoder on this host computes a batch or waits to. (Two
        decoders asking at the same instant see each other's try as a batch: one step is then
        sized for an encoder that is not there.)"""
        try:
            fcntl.flock(self._encoding_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._encoding_fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._encoding_fd)
            self._fd = self._encoding_fd = -1
