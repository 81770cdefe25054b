"""Provider adapters: one module per upstream API behind the interfaces in `base`.

Adding a provider means adding one module (with its `SPEC`) and one line in `registry.SPECS`;
every HTTP request goes through the one transport (`transport`).
Adapters never import grpc: they speak the internal OpenAI-shaped dicts of `base`
and raise `server.errors` exceptions.
"""
