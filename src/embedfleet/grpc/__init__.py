"""The gateway's gRPC edge: TEI's ``tei.v1``, the TEI manager's ``tei_multiplexer.v1`` (with its Arrow IPC
batches), ``grpc.health.v1`` and server reflection, served on the HTTP app's event loop.

Modules import the ``grpc`` library by its absolute name; this package is only ever ``embedfleet.grpc``.
The generated protobuf modules (``embedfleet.grpc.proto``) are imported only where a server or client is
built, so a process that never serves gRPC never registers the ``tei.v1`` messages.
"""
