"""`python -m train --config configs/default.py --workdir DIR [--config.KEY=VALUE ...]`.

A thin entry point: `jaxretrieval.cli` parses the flags, `jaxretrieval.training` does the work.
"""

import sys

from jaxretrieval.cli import main
from jaxretrieval.host_memory import reexec_with_huge_pages

reexec_with_huge_pages()

sys.exit(main(["train", *sys.argv[1:]], prog="python -m"))
