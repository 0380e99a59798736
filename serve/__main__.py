"""`python -m serve --workdir DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]`.

A thin entry point: `jaxretrieval.cli` parses the flags, `jaxretrieval.service` serves.
"""

import sys

from jaxretrieval.cli import main
from jaxretrieval.host_memory import reexec_with_huge_pages

reexec_with_huge_pages()

sys.exit(main(["serve", *sys.argv[1:]], prog="python -m"))
