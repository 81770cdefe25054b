"""gRPC servicers: they convert between protos and the internal OpenAI-shaped dicts,
validate, route to an adapter, and map errors. No provider logic lives here."""
