"""A real Prometheus server (Debian's `prometheus` binary, installed by `make
prometheus`) run by the tests on a free loopback port, with its own configuration and
data folder, scraping one target every second."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port


class PrometheusServer:
    def __init__(
        self, target: str, work_dir: Path, scrape_interval_s: float = 1.0, config_text: str | None = None
    ) -> None:
        self.binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._work_dir = work_dir
        self._target = target
        self._interval = scrape_interval_s
        self._process: subprocess.Popen[bytes] | None = None
        self._config_text = config_text

    async def start(self) -> None:
        self._spawn()
        await self._wait_ready()

    def _spawn(self) -> None:
        config = self._work_dir / "prometheus.yml"
        config.write_text(
            self._config_text
            or "global:\n"
            f"  scrape_interval: {self._interval:g}s\n"
            f"  evaluation_interval: {self._interval:g}s\n"
            "scrape_configs:\n"
            "  - job_name: aigne-hub\n"
            "    static_configs:\n"
            f"      - targets: ['{self._target}']\n"
        )
        log = (self._work_dir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def _wait_ready(self, timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            while loop.time() < deadline:
                assert self._process is not None and self._process.poll() is None, self.log_tail()
                try:
                    if (await client.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"Prometheus did not become ready in {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self._work_dir / "prometheus.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            response = await client.get(f"{self.url}/api/v1/query", params={"query": promql})
        body = response.json()
        assert body.get("status") == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, promql: str) -> float | None:
        """The query's single value, or None while it has no result."""
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else None

    async def wait_for(self, promql: str, expected: float, timeout_s: float = 20.0) -> float | None:
        """Polls until the query answers `expected` (scrapes are every second); returns
        the last answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen = await self.value(promql)
        while seen != expected and loop.time() < deadline:
            await asyncio.sleep(0.25)
            seen = await self.value(promql)
        return seen

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
