"""The entry points' re-execution under glibc's huge-page tunable (jaxretrieval.host_memory)."""

import json
import os
import subprocess
import sys

import pytest

from jaxretrieval import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints what the process ends up with; `first` is printed once per execution.
SCRIPT = """
import json, os, sys
print("first", os.getpid(), flush=True)
from jaxretrieval.host_memory import reexec_with_huge_pages
reexec_with_huge_pages()
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:],
                  "tunables": os.environ.get("GLIBC_TUNABLES")}))
"""


def _run(tmp_path, **env_changes):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.SWITCH)}
    env.update(env_changes)
    result = subprocess.run([sys.executable, str(script), "--flag", "a b"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    firsts = [line for line in lines if line.startswith("first")]
    return firsts, json.loads(lines[-1])


needs_huge_pages = pytest.mark.skipif(
    not (sys.platform == "linux" and host_memory.glibc_supports_hugetlb()
         and host_memory.kernel_allows_thp()),
    reason="needs glibc 2.35+ and a kernel with transparent huge pages")


@needs_huge_pages
def test_reexecutes_once_with_the_tunable_same_pid_and_argv(tmp_path):
    firsts, final = _run(tmp_path)
    assert len(firsts) == 2  # the original start, then the re-executed one, and no more
    assert firsts[0].split()[1] == firsts[1].split()[1] == str(final["pid"])
    assert final["argv"] == ["--flag", "a b"]
    assert final["tunables"] == host_memory.TUNABLE


@needs_huge_pages
def test_keeps_the_users_other_tunables(tmp_path):
    _, final = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.check=0")
    assert final["tunables"] == f"glibc.malloc.check=0:{host_memory.TUNABLE}"


def test_switched_off_or_already_set_runs_once_unchanged(tmp_path):
    firsts, final = _run(tmp_path, **{host_memory.SWITCH: "0"})
    assert len(firsts) == 1 and final["tunables"] is None
    firsts, final = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert len(firsts) == 1 and final["tunables"] == "glibc.malloc.hugetlb=0"
