"""Writing files and directories so that a reader never sees them half-written.

A file is written beside its final path and renamed into place. A directory is filled
beside its final path (`new_sibling_directory`) and then swapped in (`swap_in`); a swap cut
short between its two renames is undone by `recover_interrupted_swap`, which every reader
calls first.
"""

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """A file opened with `mode` ("w" or "wb") beside `path`, renamed into place when the
    `with` block ends without an error and removed when it raises."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def give_ordinary_mode(path: str) -> None:
    """Gives `path` the mode a plain open or mkdir would have under the current umask, for
    files that others read: `mkstemp` and `mkdtemp` make theirs private to this user."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~current_umask())


def current_umask() -> int:
    """The process's umask, read from /proc where Linux shows it: the portable way, setting
    it and putting it back, leaves a moment in which another thread's new file would get
    the temporary mask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def cache_home() -> str:
    """The package's cache folder: $XDG_CACHE_HOME/jaxretrieval, else ~/.cache/jaxretrieval
    (an empty XDG_CACHE_HOME counts as unset, as the XDG base directory spec says)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "jaxretrieval")


def write_file_atomically(path: str, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it into place."""
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomically(path: str, value) -> None:
    write_file_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def new_sibling_directory(final_dir: str) -> str:
    """An empty temporary directory beside `final_dir`, to fill and then `swap_in`."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.tmp-")


def swap_in(tmp_dir: str, final_dir: str) -> None:
    """Replaces `final_dir` by the finished `tmp_dir`; the old one is removed only after.

    `final_dir` never holds a half-written directory. Between the two renames it is briefly
    absent; a process killed right there leaves the old copy beside it, which
    `recover_interrupted_swap` (called by every reader and by the next swap) puts back.
    """
    recover_interrupted_swap(final_dir)
    old = None
    if os.path.exists(final_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(final_dir)),
                               prefix=f".{os.path.basename(final_dir)}.old-")
        os.rmdir(old)
        os.rename(final_dir, old)
    try:
        os.rename(tmp_dir, final_dir)
    except BaseException:
        if old is not None:
            os.rename(old, final_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(final_dir: str) -> None:
    """Puts back the old copy of `final_dir` if a swap was killed between its two renames."""
    if os.path.exists(final_dir):
        return
    parent = os.path.dirname(os.path.abspath(final_dir))
    prefix = f".{os.path.basename(final_dir)}.old-"
    leftovers = sorted((e for e in os.scandir(parent) if e.name.startswith(prefix))
                       if os.path.isdir(parent) else [], key=lambda e: e.stat().st_mtime)
    if leftovers:
        os.rename(leftovers[-1].path, final_dir)
