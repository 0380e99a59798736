"""Atomic files and directory swaps (jaxretrieval.fileio): a reader sees the old content or
the new, never a part, and nothing temporary is left behind."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from jaxretrieval import fileio


def test_a_file_is_written_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "sub" / "config.json"
    fileio.write_file_atomically(str(path), "first")
    fileio.write_file_atomically(str(path), "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path / "sub") == ["config.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path,
                                                                        monkeypatch):
    path = tmp_path / "metrics.json"
    fileio.write_file_atomically(str(path), "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_file_atomically(str(path), "new")
    monkeypatch.undo()
    with pytest.raises(TypeError):  # fails inside the write itself
        fileio.write_file_atomically(str(path), b"bytes are not text")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_json_is_written_sorted_with_a_final_newline(tmp_path):
    path = tmp_path / "m.json"
    fileio.write_json_atomically(str(path), {"b": 1, "a": [1.5, None]})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1.5, None], "b": 1}


def fill(directory, text):
    with open(os.path.join(directory, "v"), "w") as f:
        f.write(text)


def read(directory):
    with open(os.path.join(directory, "v")) as f:
        return f.read()


def test_swap_in_replaces_the_directory_and_removes_the_old_one(tmp_path):
    final = str(tmp_path / "index")
    first = fileio.new_sibling_directory(final)
    assert os.path.dirname(first) == str(tmp_path) and os.listdir(first) == []
    assert os.path.basename(first).startswith(".index.tmp-")
    fill(first, "1")
    fileio.swap_in(first, final)  # nothing there yet
    second = fileio.new_sibling_directory(final)
    fill(second, "2")
    fileio.swap_in(second, final)
    assert read(final) == "2" and os.listdir(tmp_path) == ["index"]


def test_a_swap_that_fails_puts_the_old_directory_back(tmp_path, monkeypatch):
    final = str(tmp_path / "index")
    old = fileio.new_sibling_directory(final)
    fill(old, "old")
    fileio.swap_in(old, final)
    new = fileio.new_sibling_directory(final)
    fill(new, "new")
    rename = os.rename

    def fail_on_the_new_one(source, target):
        if source == new:
            raise OSError("no")
        rename(source, target)

    monkeypatch.setattr(os, "rename", fail_on_the_new_one)
    with pytest.raises(OSError):
        fileio.swap_in(new, final)
    assert read(final) == "old"


# Swaps in a new copy of DIR/index and is killed between the swap's two renames.
KILLED_SWAP = """
import os, sys
from jaxretrieval import fileio
final = sys.argv[1]
new = fileio.new_sibling_directory(final)
with open(os.path.join(new, "v"), "w") as f:
    f.write("new")
renames = []
real_rename = os.rename
def rename(source, target):
    renames.append(source)
    if len(renames) == 2:
        os._exit(9)  # as a SIGKILL would: no cleanup runs
    real_rename(source, target)
os.rename = rename
fileio.swap_in(new, final)
"""


def test_a_swap_killed_between_its_renames_is_recovered(tmp_path):
    final = str(tmp_path / "index")
    old = fileio.new_sibling_directory(final)
    fill(old, "old")
    fileio.swap_in(old, final)
    killed = subprocess.run([sys.executable, "-c", KILLED_SWAP, final], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == 9, killed.stderr
    assert not os.path.exists(final)  # the kill left the old copy aside
    fileio.recover_interrupted_swap(final)
    assert read(final) == "old"
    fileio.recover_interrupted_swap(final)  # a no-op once recovered
    assert read(final) == "old"
    newest = fileio.new_sibling_directory(final)
    fill(newest, "newest")
    fileio.swap_in(newest, final)
    assert read(final) == "newest"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".index.old-")]


def test_the_next_swap_recovers_an_interrupted_one_first(tmp_path):
    final = str(tmp_path / "index")
    aside = tmp_path / ".index.old-abc"
    aside.mkdir()
    fill(str(aside), "old")
    new = fileio.new_sibling_directory(final)
    fill(new, "new")
    fileio.swap_in(new, final)
    assert read(final) == "new" and os.listdir(tmp_path) == ["index"]


def test_give_ordinary_mode_undoes_the_private_modes_of_temporary_files(tmp_path):
    umask = os.umask(0o027)
    try:
        with fileio.atomic_file(str(tmp_path / "shown.png"), "wb") as f:
            f.write(b"png")
        folder = fileio.new_sibling_directory(str(tmp_path / "export"))
        assert os.stat(tmp_path / "shown.png").st_mode & 0o777 == 0o600
        assert os.stat(folder).st_mode & 0o777 == 0o700
        fileio.give_ordinary_mode(str(tmp_path / "shown.png"))
        fileio.give_ordinary_mode(folder)
        assert os.stat(tmp_path / "shown.png").st_mode & 0o777 == 0o640
        assert os.stat(folder).st_mode & 0o777 == 0o750
        assert os.umask(0o027) == 0o027  # the umask is as it was
    finally:
        os.umask(umask)


def test_the_umask_is_read_without_changing_it(tmp_path, monkeypatch):
    umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set"))
        assert fileio.current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(umask)
