"""`aigne-hub serve --workers N`: N gRPC server processes behind the one Envoy.

The supervisor (the `serve` process) does the once-only work (migrations, configured
rates), hosts the hub (`server.serving.hub`), starts the workers and then Envoy, and
restarts whichever dies. Each worker is a full gateway process (`aigne-hub worker`):

- Envoy reaches each worker on its own Unix socket in the run folder
  (`<tmp>/aigne-hub-run-<pid>-*/worker-<i>.sock`) and balances calls with
  LEAST_REQUEST. Why not one shared port: Envoy keeps a few long-lived HTTP/2
  connections per upstream, and the kernel balances SO_REUSEPORT per connection, so
  one worker would get most of Envoy's traffic (measured: 100 % on one worker).
  The supervisor lists the workers that serve in a file Envoy watches (EDS from a
  file, `endpoints.json` in the run folder): a worker that dies is taken off the list
  at once and put back once its restart serves. Behind that, Envoy retries calls it
  could not send on another worker, ejects a worker whose connections fail (outlier
  detection on local-origin failures only) and health-checks each one.
- The public gRPC port (default 50051) is bound by every worker with SO_REUSEPORT:
  direct gRPC clients are spread by the kernel per connection.
- Workers are started through `die_with_parent.py` (Linux parent-death signal), so a
  supervisor killed with `kill -9` takes every worker (and Envoy) with it.
- A worker that exits on its own is logged and restarted after a backoff (0.5 s
  doubling to 30 s, as Envoy's); 5 failed restarts in a row end `serve` with code 1.
- Worker 0 also does the background work that one process does for all: the sweep of
  expired credit reservations and the re-check of invalid credentials (see
  `server.app`); restarted with the same index, it resumes them.
- SIGTERM/SIGINT: every worker drains in parallel (the single-process guarantees hold
  for each: streams still open at the end of the grace end with SHUTTING_DOWN), then
  Envoy stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.bridge.envoy_config import write_endpoints
from server.bridge.process import SHIM_PATH, _process_exists
from server.bridge.supervisor import BridgeFailed, RestartPolicy
from server.serving.hub import Hub

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
RUN_DIR_PREFIX = "aigne-hub-run-"


def remove_stale_run_dirs() -> None:
    """Removes the run folders (sockets) of `serve` processes that are gone (`kill -9`)."""
    for parent in {Path(tempfile.gettempdir()), Path("/tmp")}:
        for folder in parent.glob(f"{RUN_DIR_PREFIX}*-*"):
            owner = folder.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
            if owner.isdigit() and not _process_exists(int(owner)):
                shutil.rmtree(folder, ignore_errors=True)


class WorkerFailed(RuntimeError):
    """A worker could not be started or kept running."""


@dataclass
class Worker:
    index: int
    socket: Path
    process: asyncio.subprocess.Process | None = None
    # Listed as Envoy's endpoint: from "ready" until its exit is seen.
    serving: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class WorkerPool:
    """The worker processes of one `serve`."""

    def __init__(self, count: int, run_dir: Path, hub: Hub, env: Mapping[str, str]) -> None:
        self.workers = [Worker(i, run_dir / f"worker-{i}.sock") for i in range(count)]
        self.endpoints_file = run_dir / "endpoints.json"
        self._hub = hub
        self._run_dir = run_dir
        self._env = dict(env)
        self._stopping = False

    def publish(self) -> None:
        """Tells Envoy which workers serve (server.bridge.envoy_config.write_endpoints)."""
        write_endpoints(self.endpoints_file, [w.socket for w in self.workers if w.serving])

    async def start(self) -> None:
        """Starts every worker and waits until all serve."""
        await asyncio.gather(*(self._start(worker) for worker in self.workers))

    async def _start(self, worker: Worker) -> None:
        ready = self._hub.expect_ready(worker.index)
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(SHIM_PATH),
            str(os.getpid()),
            sys.executable,
            "-m",
            "server.cli",
            "worker",
            "--index",
            str(worker.index),
            "--socket",
            str(worker.socket),
            "--hub",
            str(self._hub.path),
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
        )
        exited = asyncio.ensure_future(worker.process.wait())
        try:
            done, _ = await asyncio.wait({ready, exited}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if ready not in done:
            await self._kill(worker)
            code = worker.process.returncode
            raise WorkerFailed(
                f"worker {worker.index} exited with {code} before serving"
                if code is not None
                else f"worker {worker.index} did not serve within {READY_TIMEOUT_S} s"
            )
        log.info("worker %d serving (pid %d)", worker.index, worker.pid)
        worker.serving = True

    async def supervise(self, stop: asyncio.Event, policy: RestartPolicy | None = None) -> None:
        """Restarts workers that die until `stop` is set; raises BridgeFailed (as Envoy's
        supervisor does) for a worker that keeps failing."""
        await asyncio.gather(*(self._keep(worker, stop, policy or RestartPolicy()) for worker in self.workers))

    async def _keep(self, worker: Worker, stop: asyncio.Event, policy: RestartPolicy) -> None:
        restarts = 0
        while True:
            started = time.monotonic()
            code = await _exit_or_stop(worker, stop)
            if code is None:
                return
            if time.monotonic() - started >= policy.stable_after_s:
                restarts = 0
            worker.serving = False
            self.publish()
            log.error("worker %d (pid %s) exited unexpectedly (code %s)", worker.index, worker.pid, code)
            while True:
                if restarts >= policy.max_restarts:
                    raise BridgeFailed(f"worker {worker.index} failed {restarts} times in a row; giving up")
                delay = policy.delay(restarts)
                restarts += 1
                log.warning(
                    "restarting worker %d in %.1f s (restart %d of at most %d)",
                    worker.index,
                    delay,
                    restarts,
                    policy.max_restarts,
                )
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
                try:
                    await self._start(worker)
                except (OSError, WorkerFailed) as exc:
                    log.error("worker %d restart failed: %s", worker.index, exc)
                    continue
                break
            self.publish()
            log.warning("worker %d restarted (pid %s)", worker.index, worker.pid)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM to every worker (each drains its calls), SIGKILL after `timeout_s`."""
        running = [w for w in self.workers if w.running]
        for worker in running:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._wait_or_kill(w, timeout_s) for w in running))

    async def _wait_or_kill(self, worker: Worker, timeout_s: float) -> None:
        assert worker.process is not None
        try:
            await asyncio.wait_for(worker.process.wait(), timeout_s)
        except TimeoutError:
            log.error("worker %d did not stop within %.0f s; killing it", worker.index, timeout_s)
            await self._kill(worker)

    async def _kill(self, worker: Worker) -> None:
        if worker.process is not None and worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()


async def _exit_or_stop(worker: Worker, stop: asyncio.Event) -> int | None:
    """The worker's exit code, or None if `stop` was set first."""
    assert worker.process is not None
    exited = asyncio.ensure_future(worker.process.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (exited, stopping):
            task.cancel()
    if stop.is_set():
        return None
    return exited.result()
