"""A small process pool that enforces a wall-clock deadline on every job.

Why not `concurrent.futures.ProcessPoolExecutor` or `multiprocessing.Pool`: neither can stop one
runaway job. A sympy simplification of `9^{9^{9^{9}}}` never returns and cannot be interrupted
from Python, and the usual in-process remedy (`signal.alarm`, what math-verify uses) only works in
a process's main thread, so it breaks inside Ray actors and threads. Here each worker is a
long-lived child process; a job that overruns its deadline gets its worker SIGKILLed and replaced,
and the caller receives an explicit `TIMEOUT` result instead of a hang or a silent default.

Workers are fresh interpreters, never forks: forking a process that already runs threads (Ray
actors, torch, gRPC) can deadlock the child on a lock another thread held at fork time. So a pool
can be created from any thread of any process. Workers are reused across calls, so start-up (an
interpreter plus the initializer's imports, ~1 s) is paid once per worker, not per job; the
initializer runs before a worker reports ready, so it never counts against a job's deadline.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["DeadlinePool", "JobResult", "JobStatus", "PoolStartupError"]

# Exception texts can be huge (sympy echoes whole expressions); a verdict only needs the gist.
_MAX_ERROR_CHARS = 2000


class JobStatus(str, enum.Enum):
    OK = "ok"  # the function returned; `value` holds its result
    ERROR = "error"  # the function raised, or its worker died; `error` says what happened
    TIMEOUT = "timeout"  # no answer before the deadline; the worker was killed and replaced


@dataclass(frozen=True)
class JobResult:
    status: JobStatus
    value: Any = None
    error: str = ""
    elapsed_s: float = 0.0


class PoolStartupError(RuntimeError):
    """A worker could not start (its initializer raised, it died, or it never reported ready)."""


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "...[truncated]"


# The worker is a fresh interpreter started by `subprocess`, not by `multiprocessing`: "spawn"
# re-imports the parent's `__main__` in every child, which breaks any script without an
# `if __name__ == "__main__":` guard and re-runs the entry module of Ray workers and notebooks.
# The parent's `sys.path` travels along so the child imports the same code (`prm_ray`'s
# `__init__` is lazy, so this does not pull in torch).
_BOOT = """
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from prm_ray.tasks.deadline_pool import _worker_main
_worker_main(int(sys.argv[2]), int(sys.argv[3]))
"""


def _exit_when_orphaned(parent_pid: int) -> None:
    """Watchdog thread: a worker stuck in a hung job never reads the EOF its parent's death
    leaves on the pipe, so it checks for itself whether it has been re-parented."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(fd: int, parent_pid: int) -> None:
    """Child process loop: receive `(job_id, fn, args)`, reply `(job_id, ok, payload)`."""
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    conn = Connection(fd)
    try:
        initializer, memory_limit_mb = conn.recv()
        if memory_limit_mb is not None:
            limit = int(memory_limit_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if initializer is not None:
            initializer()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("init_error", _describe(exc) + "\n" + traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent went away: nothing left to serve
        if msg is None:
            return
        job_id, fn, args = msg
        try:
            reply = (job_id, True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - a job failure must not kill the worker
            reply = (job_id, False, _describe(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send((job_id, False, f"result could not be sent back: {_describe(exc)}"))


class _Worker:
    def __init__(
        self,
        initializer: Callable[[], None] | None,
        memory_limit_mb: int | None,
        startup_timeout_s: float,
    ) -> None:
        parent_sock, child_sock = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps([str(p) for p in sys.path]),
                 str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            # Drop our copy of the child's end, so a dead child reads as EOF instead of a hang.
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        try:
            self.conn.send((initializer, memory_limit_mb))
        except BaseException:
            self.kill()
            raise
        self.ready = False
        self.startup_deadline = time.monotonic() + startup_timeout_s
        # (job index, job id, started at) while a job runs on this worker
        self.job: tuple[int, int, float] | None = None

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass  # exited in the meantime
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # unkillable (stuck in the kernel); nothing more we can do
        try:
            self.conn.close()
        except OSError:
            pass


def _shutdown(workers: list[_Worker]) -> None:
    """Stop all workers. Module-level so the finalizer does not keep the pool alive."""
    for w in workers:
        try:
            w.conn.send(None)  # polite stop; an idle worker exits right away
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 2.0
    for w in workers:
        try:
            w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()  # anything still running (a busy or stuck worker) is killed
    workers.clear()


class DeadlinePool:
    """`num_workers` reusable worker processes; every job gets a wall-clock deadline.

    Use as a context manager or call `close()`; a finalizer also stops the workers when the pool
    is garbage-collected or the interpreter exits. Safe to create and call from any thread; calls
    from several threads are serialised (one `map` at a time owns all workers).

    `fn` must be picklable by reference, i.e. a module-level function; its arguments and return
    value must pickle. `memory_limit_mb` caps each worker's address space (RLIMIT_AS) so a
    runaway job fails with MemoryError instead of exhausting the machine.
    """

    def __init__(
        self,
        num_workers: int = 1,
        initializer: Callable[[], None] | None = None,
        *,
        memory_limit_mb: int | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        try:
            pickle.dumps(initializer)
        except Exception as exc:
            raise TypeError(f"initializer must be a module-level function (it is sent to the "
                            f"workers by reference): {_describe(exc)}") from exc
        self._initializer = initializer
        self._memory_limit_mb = memory_limit_mb
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._job_ids = itertools.count()
        self._closed = False
        self.restarts = 0  # workers replaced after a timeout or a crash, over the pool's life
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        try:
            for _ in range(num_workers):  # start all first: their start-ups overlap
                self._workers.append(self._new_worker())
            self._await_ready(self._workers)
        except BaseException:
            self._finalizer()
            raise

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def closed(self) -> bool:
        return self._closed

    def _new_worker(self) -> _Worker:
        return _Worker(self._initializer, self._memory_limit_mb, self._startup_timeout_s)

    def _on_startup_message(self, w: _Worker) -> None:
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            w.kill()
            raise PoolStartupError(
                f"worker pid {w.process.pid} died during start-up "
                f"(exit code {w.exitcode})") from None
        if kind != "ready":
            w.kill()
            raise PoolStartupError(f"worker initializer failed: {payload}")
        w.ready = True

    def _await_ready(self, workers: list[_Worker]) -> None:
        pending = [w for w in workers if not w.ready]
        while pending:
            timeout = max(0.0, min(w.startup_deadline for w in pending) - time.monotonic())
            for conn in wait([w.conn for w in pending], timeout=timeout):
                self._on_startup_message(next(w for w in pending if w.conn is conn))
            now = time.monotonic()
            for w in pending:
                if not w.ready and now > w.startup_deadline:
                    w.kill()
                    raise PoolStartupError(
                        f"worker did not start within {self._startup_timeout_s}s")
            pending = [w for w in pending if not w.ready]

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self.restarts += 1
        new = self._new_worker()
        self._workers[self._workers.index(w)] = new
        return new

    def map(
        self, fn: Callable[..., Any], jobs: Sequence[tuple], timeout_s: float
    ) -> list[JobResult]:
        """Run `fn(*args)` for every `args` in `jobs`; results come back in input order.

        Each job's deadline starts when a worker picks it up, so a long queue does not eat into
        it. A replacement worker's start-up does not count against any job either.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            if self._closed:
                raise RuntimeError("DeadlinePool is closed")
            return self._map_locked(fn, list(jobs), timeout_s)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> JobResult:
        """One job; see `map`."""
        return self.map(fn, [args], timeout_s)[0]

    def _map_locked(self, fn: Callable[..., Any], jobs: list[tuple],
                    timeout_s: float) -> list[JobResult]:
        results: list[JobResult | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        busy: dict[Connection, _Worker] = {}
        starting: dict[Connection, _Worker] = {w.conn: w for w in self._workers if not w.ready}

        def finish(w: _Worker, result: JobResult) -> None:
            results[w.job[0]] = result
            w.job = None
            del busy[w.conn]

        try:
            while queue or busy:
                for w in self._workers:
                    if not queue:
                        break
                    if w.ready and w.job is None:
                        idx = queue.popleft()
                        job_id = next(self._job_ids)
                        try:
                            w.conn.send((job_id, fn, tuple(jobs[idx])))
                        except OSError:
                            # Worker died while idle (e.g. OOM-killed): replace, retry the job.
                            queue.appendleft(idx)
                            new = self._replace(w)
                            starting[new.conn] = new
                            continue
                        w.job = (idx, job_id, time.monotonic())
                        busy[w.conn] = w
                if not busy and not starting:
                    if queue:  # cannot happen with >= 1 worker; guards against a silent spin
                        raise RuntimeError("DeadlinePool has no usable worker")
                    break
                deadlines = [w.job[2] + timeout_s for w in busy.values()]
                deadlines += [w.startup_deadline for w in starting.values()]
                wait_s = max(0.0, min(deadlines) - time.monotonic())
                for conn in wait(list(busy) + list(starting), timeout=wait_s):
                    if conn in starting:
                        self._on_startup_message(starting.pop(conn))
                        continue
                    w = busy[conn]
                    elapsed = time.monotonic() - w.job[2]
                    try:
                        job_id, ok, payload = conn.recv()
                    except (EOFError, OSError):
                        try:
                            code = w.process.wait(timeout=1)
                        except subprocess.TimeoutExpired:
                            code = None
                        finish(w, JobResult(JobStatus.ERROR, error=(
                            f"worker process died while running the job (exit code {code}; "
                            "a negative code is the signal, e.g. -9 = killed, often out of "
                            "memory)"), elapsed_s=elapsed))
                        new = self._replace(w)
                        starting[new.conn] = new
                        continue
                    if job_id != w.job[1]:  # protocol invariant, never expected
                        raise RuntimeError(f"worker answered job {job_id}, expected {w.job[1]}")
                    finish(w, JobResult(JobStatus.OK, value=payload, elapsed_s=elapsed) if ok
                           else JobResult(JobStatus.ERROR, error=payload, elapsed_s=elapsed))
                now = time.monotonic()
                for w in list(busy.values()):
                    if now - w.job[2] >= timeout_s:
                        finish(w, JobResult(JobStatus.TIMEOUT, error=(
                            f"no answer within {timeout_s:g}s; worker killed and replaced"),
                            elapsed_s=now - w.job[2]))
                        new = self._replace(w)
                        starting[new.conn] = new
                for conn, w in list(starting.items()):
                    if now > w.startup_deadline:
                        del starting[conn]
                        w.kill()
                        raise PoolStartupError(
                            f"replacement worker did not start within {self._startup_timeout_s}s")
        except BaseException:
            # Interrupted mid-flight (KeyboardInterrupt, protocol error): workers still hold
            # jobs whose answers would be misattributed to the next call. Replace them.
            for w in list(busy.values()):
                w.job = None
                self._replace(w)
            raise
        return results  # type: ignore[return-value]  # every slot is filled by now

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> None:
        raise TypeError("a DeadlinePool owns processes and cannot be pickled; create one per "
                        "process (e.g. inside each Ray actor)")
