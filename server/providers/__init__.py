"""Provider adapters: one module per upstream API behind the interfaces in `base`.

Adding a provider means adding one module and one line in `registry.ADAPTERS`.
Adapters never import grpc: they speak the internal OpenAI-shaped dicts of `base`
and raise `server.errors` exceptions.
"""
