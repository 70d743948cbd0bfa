"""Engines behind an HTTP server: the app (:mod:`adapter.serve.app`) and dynamic batching
(:mod:`adapter.serve.batching`)."""
