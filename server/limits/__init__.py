"""Rate limits and spend windows per key, owner and model (see `rules`, `counters`,
`limiter`): enforced once across every replica through Redis, or in the process
without it."""

from server.limits.limiter import Admission, DefaultLimits, Limiter, open_limiter
from server.limits.rules import LimitRule, LimitStore, check_rule

__all__ = ["Admission", "DefaultLimits", "LimitRule", "LimitStore", "Limiter", "check_rule", "open_limiter"]
