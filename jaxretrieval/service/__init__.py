"""The HTTP service and its web page, over a Retriever: `create_app(retriever, ...)`."""
