"""The HTTP service and its web page, over a Retriever: `create_app(retriever, ...)`.

app.py builds the app (settings, micro-batcher, error handlers, middleware); routes.py holds
the endpoints; metrics.py the Prometheus series; batching.py the micro-batcher.
"""
