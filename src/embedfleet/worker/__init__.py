"""The inference worker: one model replica behind text-embeddings-inference's HTTP API."""
