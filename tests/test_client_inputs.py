"""Expanding the predict CLI's PATH arguments (client/image_files.py): files, folders, globs."""

from __future__ import annotations

from pathlib import Path

from client.image_files import collect


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folders_recurse_in_order_and_keep_only_image_suffixes(tmp_path):
    b, a, c = touch(tmp_path / "b.PNG"), touch(tmp_path / "a.jpg"), touch(tmp_path / "sub" / "c.webp")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden" / "d.png")
    inputs = collect([str(tmp_path)])
    assert inputs.files == [a, b, c] and not inputs.problems


def test_explicit_files_are_sent_whatever_their_suffix_and_only_once(tmp_path):
    notes, a = touch(tmp_path / "notes.txt"), touch(tmp_path / "a.jpg")
    inputs = collect([str(notes), str(a), str(tmp_path), str(a)])
    assert inputs.files == [notes, a]


def test_globs_and_missing_paths(tmp_path):
    a, c = touch(tmp_path / "x" / "a.png"), touch(tmp_path / "y" / "z" / "c.png")
    touch(tmp_path / "y" / "b.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    inputs = collect([f"{tmp_path}/**/*.png", str(tmp_path / "nope.jpg"), f"{tmp_path}/*.gif", str(empty)])
    assert inputs.files == [a, c]
    assert inputs.problems == [
        (str(tmp_path / "nope.jpg"), "no such file or folder"),
        (f"{tmp_path}/*.gif", "no file matches this pattern"),
        (str(empty), inputs.problems[2][1]),
    ]
    assert inputs.problems[2][1].startswith("no image files")
