"""transformers_vpt.files: whole-file writes are atomic and never write through another file."""

import os

import pytest

from transformers_vpt import files
from transformers_vpt.files import write_atomic, write_json, write_text


def test_json_and_text_replace_the_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"é": [1, 2]})
    assert path.read_text(encoding="utf-8") == '{\n "é": [\n  1,\n  2\n ]\n}\n'
    write_json(path, [1], indent=2)
    assert path.read_text() == "[\n  1\n]\n"
    write_text(path, "plain")
    assert path.read_text() == "plain" and os.listdir(path.parent) == ["out.json"]


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def half(file):
        file.write(b"[{")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_files_and_links_at_temporary_names_are_never_written(tmp_path, monkeypatch):
    path, other = tmp_path / "out.json", tmp_path / "other.txt"
    other.write_text("keep")
    taken = tmp_path / f".out.json.{os.getpid()}.aaaa.tmp"  # a killed run's temporary file, or a planted link
    taken.symlink_to(other)
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    write_text(path, "new")
    assert path.read_text() == "new" and other.read_text() == "keep" and taken.is_symlink()
    assert sorted(os.listdir(tmp_path)) == sorted([taken.name, "other.txt", "out.json"])
