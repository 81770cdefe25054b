"""What a gRPC worker loads: packages only `serve` (or an optional feature) needs stay
out of it, since every worker pays their memory (each module costs RSS in every
process; `make soak` shows the totals).

A worker is `python -m server.cli worker`: it imports the CLI module, the app and the
servicers. Alembic (migrations run once, in serve), httpx (serve's readiness polls),
aiohttp (the upstream transport's form encoder, for uploads only), botocore (Bedrock
only) and OpenTelemetry (tracing only) must be imported only by the code that uses them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LAZY = ("alembic", "httpx", "aiohttp", "click", "pygments", "botocore", "boto3", "opentelemetry")

WORKER_IMPORTS = """
import json, sys
import server.cli
from server.app import start_gateway
import server.api.chat, server.api.embeddings, server.api.images, server.api.audio
import server.api.agent, server.api.bridge, server.api.admin, server.api.account
import server.providers.registry
print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))
"""


@pytest.fixture(scope="module")
def worker_packages() -> set[str]:
    done = subprocess.run([sys.executable, "-c", WORKER_IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("package", LAZY)
def test_a_worker_does_not_import(package: str, worker_packages: set[str]) -> None:
    assert package not in worker_packages


def test_the_check_sees_what_a_worker_does_import(worker_packages: set[str]) -> None:
    # The same run does load what serving needs: the check above is not vacuous.
    assert {"grpc", "httptools", "sqlalchemy", "server"} <= worker_packages
