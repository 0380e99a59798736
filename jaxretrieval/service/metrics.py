"""The service's Prometheus series and the middleware that measures every request."""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Requests, errors, latency, embedding batch sizes and the gallery's size.

    Each app has its own registry, so that two apps in one process count apart.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, retriever):
        self.registry = CollectorRegistry()
        self.requests = Counter("jaxretrieval_requests", "HTTP requests",
                                ["method", "endpoint", "status"], registry=self.registry)
        self.errors = Counter("jaxretrieval_request_errors", "HTTP requests answered 4xx/5xx",
                              ["method", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "jaxretrieval_request_latency_seconds", "Time to answer a request",
            ["method", "endpoint"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram(
            "jaxretrieval_embed_batch_size", "Images per compiled embedding call",
            registry=self.registry, buckets=BATCH_SIZE_BUCKETS)
        items = Gauge("jaxretrieval_index_items", "Items in the index", registry=self.registry)
        items.set_function(lambda: retriever.count)

    def observe_request(self, scope, status: int, seconds: float) -> None:
        """Counts and times one request (an ObserveRequests observer), by its route."""
        method, endpoint = scope["method"], getattr(scope.get("route"), "path", "unmatched")
        self.requests.labels(method, endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(method, endpoint, str(status)).inc()
        self.latency.labels(method, endpoint).observe(seconds)

    def exposition(self) -> bytes:
        """Every series in Prometheus' text format (served as `content_type`)."""
        return generate_latest(self.registry)


class ObserveRequests:
    """ASGI middleware that calls `observe(scope, status, seconds)` once every HTTP request
    has ended (status 500 for one that failed before answering).

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, whose per-request cost is about
    that of a small search.
    """

    def __init__(self, app, observe):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.observe(scope, status[0], time.perf_counter() - start)
