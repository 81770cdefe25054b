"""How services are added to the gRPC server: as generic handlers only.

The stubs that grpcio-tools generates add each service twice: as a generic handler
and as "registered methods". grpc.aio keeps one pending request-call task per
registered method, and on every call it accepts it waits on all of them at once
(`asyncio.wait(..., FIRST_COMPLETED)`, twice per call), adding and removing a
callback on each: a cost per call that grows with the number of methods the server
has, about 40 here (chat, bridge, agent, admin, health, reflection...). Served through
their generic handlers only, every call is taken by the one general request-call task,
and its method is found by one dictionary lookup per service. What a client sees does
not change (same methods, same handlers, same interceptors).

Measured at 16 concurrent REST chat calls: see the README's benchmark notes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc


class GenericHandlersOnly:
    """The part of `grpc.aio.Server` that generated `add_*_to_server` functions call,
    adding every service as a generic handler only (see the module docstring)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        """Nothing: the generic handler added with them serves the same methods."""
