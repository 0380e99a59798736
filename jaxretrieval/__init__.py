"""jaxretrieval: image retrieval and matching with a CNN trained in JAX and a ScaNN index.

    from jaxretrieval import Retriever
    r = Retriever.load("runs/default")
    keys, scores = r.search(images, k=10)
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Import lazily: `import jaxretrieval` should not pay for JAX, TF and ScaNN up front.
    if name == "Retriever":
        from jaxretrieval.retriever import Retriever
        return Retriever
    raise AttributeError(f"module 'jaxretrieval' has no attribute {name!r}")
