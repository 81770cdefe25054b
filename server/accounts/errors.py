"""Errors of the accounts layer (keys, allow-lists, credits), in the gateway's tree.

    GatewayError
    ├── Unauthenticated           no key given                         UNAUTHENTICATED (401)
    │   ├── KeyInvalid            malformed, unknown or wrong secret   UNAUTHENTICATED (401)
    │   ├── KeyExpired            past its expiry                      UNAUTHENTICATED (401)
    │   └── KeyRevoked            revoked                              UNAUTHENTICATED (401)
    ├── PermissionDenied          the key may not do this              PERMISSION_DENIED (403)
    │   └── ModelNotAllowed       model outside the key's allow-list   PERMISSION_DENIED (403)
    └── QuotaExceeded             no money left                        RESOURCE_EXHAUSTED (429)
        ├── InsufficientCredits   the owner's balance is too low       RESOURCE_EXHAUSTED (429)
        └── SpendingCapReached    the key's spending cap is reached    RESOURCE_EXHAUSTED (429)

`server.api.errors.GRPC_CODES` maps them to gRPC codes with the rest of the tree; the
reasons are `aigne.hub.v1.ErrorReason` values.
"""

from __future__ import annotations

from server.errors import GatewayError

MICROS_PER_CREDIT = 1_000_000


def format_credits(micros: int) -> str:
    """12.345678 credits, exact (micro-credits are the unit)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


class Unauthenticated(GatewayError):
    """No API key was presented."""

    reason = "UNAUTHENTICATED"
    openai_type = "authentication_error"


class KeyInvalid(Unauthenticated):
    """The key is malformed, unknown, or its secret is wrong."""

    reason = "KEY_INVALID"


class KeyExpired(Unauthenticated):
    """The key is past its expiry time."""

    reason = "KEY_EXPIRED"


class KeyRevoked(Unauthenticated):
    """The key was revoked."""

    reason = "KEY_REVOKED"


class PermissionDenied(GatewayError):
    """The key is valid but may not do what was asked."""

    reason = "PERMISSION_DENIED"
    openai_type = "permission_denied_error"


class ModelNotAllowed(PermissionDenied):
    """The model is not in the key's allow-list (or, with billing on, has no rate)."""

    reason = "MODEL_NOT_ALLOWED"


class QuotaExceeded(GatewayError):
    """The call would spend more than is available."""

    reason = "INSUFFICIENT_CREDITS"
    openai_type = "insufficient_quota"

    def __init__(self, message: str, *, available_micros: int, needed_micros: int) -> None:
        super().__init__(
            message,
            metadata={
                "available_credits": format_credits(available_micros),
                "needed_credits": format_credits(needed_micros),
            },
        )
        self.available_micros = available_micros
        self.needed_micros = needed_micros


class InsufficientCredits(QuotaExceeded):
    """The owner's balance (minus what in-flight calls hold) is below the call's cost."""

    reason = "INSUFFICIENT_CREDITS"


class SpendingCapReached(QuotaExceeded):
    """The key's spending cap leaves less than the call's cost."""

    reason = "SPENDING_CAP_REACHED"
