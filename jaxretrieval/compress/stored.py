"""A compressed workdir's record (`DIR/compression.json`) and how its stored model becomes
the variables and module it embeds with.

The Embedder reads a workdir through here, so every way of loading a workdir (Retriever.load,
serve, search, embed, `--eval_only`, the model export) embeds a compressed model as it was
stored, with nothing else to configure.
"""

import json
import os

from jaxretrieval.compress.methods import get_method
from jaxretrieval.errors import JaxRetrievalError

COMPRESSION_FILE = "compression.json"
FORMAT_VERSION = 1
# The entries of compression.json that the index manifest carries as its `compression`.
MANIFEST_KEYS = ("method", "options", "model_bytes", "source_model_bytes")


def compression_path(workdir: str) -> str:
    return os.path.join(workdir, COMPRESSION_FILE)


def read_compression(workdir: str) -> dict | None:
    """The workdir's compression record, or None for a workdir that is not compressed."""
    path = compression_path(workdir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise JaxRetrievalError(
            f"{path} cannot be read ({err}); compress the source workdir again into a new "
            "--output") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise JaxRetrievalError(
            f"{path} is not a compression record of format {FORMAT_VERSION}; compress the "
            "source workdir again with this version")
    get_method(record.get("method"))  # a method this version does not know is refused
    return record


def manifest_entry(record: dict) -> dict:
    """What the index manifest records of a compressed model."""
    return {key: record[key] for key in MANIFEST_KEYS}


def unpack_variables(record: dict, stored: dict) -> dict:
    """The variables a compressed model embeds with, from its checkpoint's stored form."""
    return get_method(record["method"]).unpack(stored, record["options"])


def wrap_model(record: dict | None, model):
    """The module a compressed model embeds with (the plain one for most methods)."""
    if record is None:
        return model
    return get_method(record["method"]).wrap_model(model, record["options"])
