"""``embedfleet bench``: a load tool for any embedding endpoint (embedfleet, TEI, infinity, OpenAI-compatible).

Modules: :mod:`~embedfleet.bench.loadgen` (the lean keep-alive HTTP/1.1 client the benchmarks share),
:mod:`~embedfleet.bench.modes` (the protocols, one registry), :mod:`~embedfleet.bench.texts` (text sources and
the hit-ratio mix), :mod:`~embedfleet.bench.runner` (closed and open loops), :mod:`~embedfleet.bench.stats`,
:mod:`~embedfleet.bench.report` (tables, JSON, plot) and :mod:`~embedfleet.bench.command` (the CLI wiring).
"""
