"""`make bench` (`python -m tests.bench`): throughput and latency of the whole stack on
this machine, loaded with wrk. Not a test: it prints figures from one run.

Targets, each at 1, 16 and 64 concurrent connections (configurable):
  (a) GET /status through the REST bridge: the ceiling for anything through Envoy + gRPC.
  (b) POST /v1/chat/completions through the bridge -> gRPC server -> OpenAI adapter -> fake.
  (c) the fake upstream called directly: what (b) costs beyond the upstream itself.
  (d) a streamed chat completion (about 20 SSE events) through the whole stack.

The fake upstream is an Envoy answering with `direct_response`, so it costs next to no
CPU; the gRPC server runs in its own process so its CPU time per request can be read
from /proc.
"""
