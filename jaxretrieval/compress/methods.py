"""The compression methods by name: what `jaxretrieval compress --method NAME` and
`compress_workdir(..., method=NAME)` look up.

Adding a method: a module in this package with a `Method` subclass (`base.Method`), and one
line here. Its options appear on the command line by themselves (`--NAME VALUE`, see
`jaxretrieval compress --help`).
"""

from jaxretrieval.compress.base import Method
from jaxretrieval.compress.channels import CHANNELS
from jaxretrieval.compress.int8 import INT8
from jaxretrieval.compress.prune import PRUNE
from jaxretrieval.compress.share import SHARE
from jaxretrieval.errors import JaxRetrievalError

METHODS: dict[str, Method] = {
    "prune": PRUNE,
    "channels": CHANNELS,
    "share": SHARE,
    "int8": INT8,
}


def get_method(name: str) -> Method:
    """The method called `name`; JaxRetrievalError naming the known ones."""
    if name not in METHODS:
        raise JaxRetrievalError(
            f"unknown compression method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]
