"""Runs Envoy as a child process of the gateway (or of a test) and waits for it."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx

from server.bridge.envoy_config import envoy_executable


class EnvoyProcess:
    """One Envoy, started from a rendered config file, logging to a file."""

    def __init__(self, config_yaml: str, *, admin_url: str, work_dir: Path | None = None) -> None:
        self._dir = work_dir or Path(tempfile.mkdtemp(prefix="aigne-hub-envoy-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self._dir / "envoy.yaml"
        self.config_path.write_text(config_yaml)
        self.log_path = self._dir / "envoy.log"
        self.admin_url = admin_url.rstrip("/")
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, *, ready_timeout_s: float = 15.0) -> None:
        log = self.log_path.open("ab")
        self._process = await asyncio.create_subprocess_exec(
            envoy_executable(),
            "-c",
            str(self.config_path),
            "--log-level",
            os.environ.get("AIGNE_HUB_ENVOY_LOG_LEVEL", "warning"),
            # Several Envoys (tests, replicas) on one machine must not share hot-restart memory.
            "--disable-hot-restart",
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.close()
        await self._wait_ready(ready_timeout_s)

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.returncode is not None:
                    raise RuntimeError(f"envoy exited with {self._process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.admin_url}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout_s} s:\n{self.log_tail()}")

    async def stop(self, timeout_s: float = 5.0) -> None:
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
