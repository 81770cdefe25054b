"""Load balancing: the order in which a model's deployments are tried.

- `weighted` (default): a weighted random order (each next pick proportional to the
  weights of the deployments not yet picked), so over many calls each deployment gets
  its share of first attempts.
- `least-busy`: fewest calls in flight in this process first.
- `latency`: lowest moving average of time to first token (this process) first;
  a deployment never measured goes first so that it gets measured.

Deployments at rest (see `server.routing.cooldown`) are left out by the caller.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.config import Strategy

# Weight of the newest sample in the latency moving average.
EWMA_ALPHA = 0.3


@dataclass
class DeploymentStats:
    """What this process knows of one deployment's traffic."""

    in_flight: int = 0
    ttft_ewma_s: float | None = None

    def observe_ttft(self, seconds: float) -> None:
        previous = self.ttft_ewma_s
        self.ttft_ewma_s = seconds if previous is None else EWMA_ALPHA * seconds + (1 - EWMA_ALPHA) * previous


@dataclass
class Stats:
    """Per-deployment counters of this process, by deployment name."""

    by_name: dict[str, DeploymentStats] = field(default_factory=dict)

    def of(self, name: str) -> DeploymentStats:
        stats = self.by_name.get(name)
        if stats is None:
            stats = self.by_name[name] = DeploymentStats()
        return stats


def order(
    names: Sequence[str],
    weights: Sequence[float],
    strategy: Strategy,
    stats: Stats,
    rng: random.Random | None = None,
) -> list[int]:
    """Indexes of `names` in the order to try them."""
    rng = rng or random.Random()
    if strategy == "least-busy":
        return sorted(range(len(names)), key=lambda i: (stats.of(names[i]).in_flight, rng.random()))
    if strategy == "latency":
        return sorted(range(len(names)), key=lambda i: (stats.of(names[i]).ttft_ewma_s or 0.0, rng.random()))
    return _weighted_order(weights, rng)


def _weighted_order(weights: Sequence[float], rng: random.Random) -> list[int]:
    # Efraimidis-Spirakis: sorting by u^(1/w) descending is a weighted random order.
    keys = [(rng.random() ** (1.0 / weight), index) for index, weight in enumerate(weights)]
    return [index for _, index in sorted(keys, reverse=True)]
