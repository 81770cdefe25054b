"""Runs Envoy as a child process of the gateway (or of a test) and waits for it.

Guarantees, each against a failure seen in practice:
- Envoy dies with its parent: it is started through `die_with_parent.py` (Linux
  parent-death signal, SIGKILL), so a gateway killed with `kill -9` leaves no Envoy behind.
- Envoy outlives the drain: it runs in a session (process group) of its own, so Ctrl-C
  (SIGINT to the terminal's foreground group) reaches only the gateway, which stops Envoy
  once its calls in flight have ended.
- The Envoy that answers is the one started: each start passes a fresh node id
  (`--service-node`), and readiness means the admin's `/server_info` reports that id. An
  older Envoy still holding the admin port cannot pass for the new one.
- A port already taken fails the start with a message naming it (`PortInUse`), checked
  before Envoy starts; the REST listener also refuses to share its port (no SO_REUSEPORT).
- The folder it creates for the config and log (`aigne-hub-envoy-<pid>-*` in the temp
  folder) is removed by `stop`; a folder passed in as `work_dir` is left alone. Folders
  of processes that no longer exist (a gateway killed with `kill -9`) are removed when
  the next one is created.
- `start` may be called again after Envoy exited (the supervisor in `serve` does).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.bridge.envoy_config import check_envoy_log_level, envoy_executable

if TYPE_CHECKING:
    import httpx

SHIM_PATH = Path(__file__).resolve().parent / "die_with_parent.py"


WORK_DIR_PREFIX = "aigne-hub-envoy-"


def remove_stale_work_dirs() -> None:
    """Removes the temp folders of Envoys whose gateway process is gone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_DIR_PREFIX}*-*"):
        owner = folder.name.removeprefix(WORK_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _process_exists(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class PortInUse(OSError):
    """A port Envoy must listen on is taken by another process."""


@dataclass(frozen=True)
class Listen:
    """A port Envoy will listen on, named for error messages (e.g. "REST", "Envoy admin")."""

    name: str
    host: str
    port: int


def check_ports_free(listens: Sequence[Listen]) -> None:
    """Raises PortInUse for the first port something already listens on."""
    for listen in listens:
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As Envoy does: a port with connections in TIME_WAIT is free, one with a
            # listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((listen.host, listen.port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUse(
                    exc.errno,
                    f"the {listen.name} port {listen.host}:{listen.port} is already in use; another "
                    f"aigne-hub (or an Envoy left over from one) may be running: "
                    f"`ss -ltnp 'sport = :{listen.port}'` shows which process holds it",
                ) from exc


class EnvoyProcess:
    """One Envoy, started from a rendered config file, logging to a file."""

    def __init__(
        self,
        config_yaml: str,
        *,
        admin_url: str,
        work_dir: Path | None = None,
        log_level: str | None = None,
        listens: Sequence[Listen] = (),
        threads: int | None = None,
    ) -> None:
        """`threads`: Envoy's worker threads (`--concurrency`; None: one per core)."""
        self._owns_dir = work_dir is None
        if work_dir is None:
            remove_stale_work_dirs()
        self._dir = work_dir or Path(tempfile.mkdtemp(prefix=f"{WORK_DIR_PREFIX}{os.getpid()}-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self._dir / "envoy.yaml"
        self.config_path.write_text(config_yaml)
        self.log_path = self._dir / "envoy.log"
        self.admin_url = admin_url.rstrip("/")
        self.log_level = check_envoy_log_level(
            log_level if log_level is not None else os.environ.get("AIGNE_HUB_ENVOY_LOG_LEVEL", "warning")
        )
        self._listens = tuple(listens)
        self._threads = threads
        self._process: asyncio.subprocess.Process | None = None
        self.node_id = ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, *, ready_timeout_s: float = 15.0) -> None:
        """Starts Envoy and returns once it is ready; raises (and leaves no Envoy
        running) if it exits, is not ready in time, or another Envoy answers."""
        check_ports_free(self._listens)
        self.node_id = f"aigne-hub-{os.getpid()}-{secrets.token_hex(6)}"
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                str(SHIM_PATH),
                str(os.getpid()),
                envoy_executable(),
                "-c",
                str(self.config_path),
                "--log-level",
                self.log_level,
                "--service-node",
                self.node_id,
                "--service-cluster",
                "aigne-hub",
                # Several Envoys (tests, replicas) on one machine must not share hot-restart memory.
                "--disable-hot-restart",
                *(("--concurrency", str(self._threads)) if self._threads else ()),
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
                # A session of its own: Ctrl-C in a terminal signals the foreground process
                # group, and Envoy must not stop before the gateway has drained its calls;
                # the gateway stops it after the drain (setsid runs in the C fork path, and
                # the parent-death signal survives it).
                start_new_session=True,
            )
        try:
            await self._wait_ready(ready_timeout_s)
        except BaseException:
            await self.terminate(5.0)
            raise

    async def wait(self) -> int:
        """Waits until this Envoy exits; its exit code (negative: killed by that signal)."""
        if self._process is None:
            raise RuntimeError("envoy was not started")
        return await self._process.wait()

    async def _wait_ready(self, timeout_s: float) -> None:
        import httpx  # here: gRPC workers import this module and never start an Envoy

        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.returncode is not None:
                    raise RuntimeError(f"envoy exited with {self._process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.admin_url}/ready")).status_code == 200:
                        await self._check_identity(client)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout_s} s:\n{self.log_tail()}")

    async def _check_identity(self, client: httpx.AsyncClient) -> None:
        """Raises unless the Envoy answering on the admin port is the one just started."""
        info = (await client.get(f"{self.admin_url}/server_info")).json()
        answering = info.get("node", {}).get("id") if isinstance(info, dict) else None
        if answering != self.node_id:
            raise RuntimeError(
                f"another Envoy answers on the admin address {self.admin_url} (node {answering!r}, "
                f"not {self.node_id!r}): a previous aigne-hub's Envoy may still be running"
            )

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stops Envoy (SIGTERM, then SIGKILL after `timeout_s`) and removes the folder
        this object created."""
        await self.terminate(timeout_s)
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def terminate(self, timeout_s: float = 5.0) -> None:
        """Stops Envoy (SIGTERM, then SIGKILL after `timeout_s`); `start` may follow."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no envoy log)"
