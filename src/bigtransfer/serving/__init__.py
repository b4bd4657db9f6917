"""`bigtransfer serve`: a trained model behind HTTP, batching requests as they come.

`options` (what the server is told), `requests` (reading bodies and images; every client mistake
as a 4xx with one line), `batcher` (dynamic batching on worker threads), `metrics` (Prometheus),
`app` (the routes), `server` (binding, running, stopping on SIGTERM), `static/` (the page at /).

Built on FastAPI + uvicorn with our own batcher rather than LitServe: with LitServe 0.2.19, one bad
image in a dynamic batch failed every request of that batch, a non-JSON body was a 500, and
SIGTERM to its main process left its HTTP and inference processes running
(benchmarks/serve_litserve_check.py shows all three).
"""

from .options import ServeOptions, check_options

__all__ = ["ServeOptions", "check_options"]
