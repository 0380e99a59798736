"""Transparent huge pages for the large host allocations of XLA on CPU.

XLA's CPU runtime gets each execution's buffers from malloc, and glibc serves allocations
this large (a convolution network's temporaries run to many megabytes per device) with a
fresh mmap that it unmaps again on free: every step then faults in and zeroes each 4 KiB
page anew. Started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35+), malloc asks
for transparent huge pages on those mappings, which take far fewer page faults
(BENCHMARKS.md has the figures). The tunable is read once, when a process starts, so the
command-line entry points re-execute themselves with it set, before anything else runs.
`JAXRETRIEVAL_HUGE_PAGES=0` turns this off.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "JAXRETRIEVAL_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_supports_hugetlb() -> bool:
    library, version = platform.libc_ver()
    if library != "glibc":
        return False
    try:
        return tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def kernel_allows_thp() -> bool:
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_wanted() -> bool:
    """Whether this process should be running with the tunable and is not yet."""
    return (sys.platform == "linux" and os.environ.get(SWITCH, "1") != "0"
            and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")
            and glibc_supports_hugetlb() and kernel_allows_thp())


def reexec_with_huge_pages() -> None:
    """Replaces this process with the same command line under the tunable (same PID, so
    process managers and signals are unaffected); returns only when nothing is to be done.
    Call it first thing in a `__main__`, never from library code: it does not return."""
    if not huge_pages_wanted():
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
