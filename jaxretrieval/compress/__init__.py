"""Smaller and faster models: a trained workdir compressed into a new workdir that loads,
serves and searches like any other (docs/compression.md).

    from jaxretrieval.compress import compress_workdir
    record = compress_workdir("runs/faces", "runs/faces_channels", "channels", {"keep": 0.5})

Methods by name are in `METHODS` (`methods.py`, one module each): `prune` (unstructured
gradual magnitude pruning), `channels` (structured channel pruning), `share` (k-means weight
sharing). `compress_workdir` (`run.py`) fine-tunes, stores, embeds, evaluates and indexes;
`stored.py` is how a compressed workdir's model is read back.
"""

from jaxretrieval.compress.base import Compressed, Method, Option, Source, tree_bytes
from jaxretrieval.compress.methods import METHODS, get_method
from jaxretrieval.compress.stored import read_compression


def compress_workdir(source_dir, output_dir, method, options=None, **kwargs):
    """See `jaxretrieval.compress.run.compress_workdir` (imported when called: it needs the
    whole pipeline, which itself reads compressed workdirs through this package)."""
    from jaxretrieval.compress.run import compress_workdir as run
    return run(source_dir, output_dir, method, options, **kwargs)


__all__ = ["METHODS", "Compressed", "Method", "Option", "Source", "compress_workdir",
           "get_method", "read_compression", "tree_bytes"]
