"""Routing: from the model a client names to the deployment that answers.

router.py    what a model name means: its deployments and fallbacks (the `Plan`)
attempts.py  running a call over its plan: retries, fallbacks, timeouts
balance.py   the order in which a model's deployments are tried
cooldown.py  resting deployments that keep failing (shared through Redis if set)
policy.py    which failures are retried and which change the fallback chain
"""
