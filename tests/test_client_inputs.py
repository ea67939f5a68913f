"""Expanding the predict CLI's PATH arguments (client/image_files.py): files, folders, globs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import ROOT

from client.image_files import collect
from serve.server import free_port


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


def test_globs_expand_recursively_and_missing_paths_unmatched_globs_and_empty_folders_are_reported(tmp_path):
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


def looped_tree(root: Path) -> tuple[Path, Path, Path]:
    """``root/photos`` with an image, a sub-folder, links back to itself and its parent, a linked folder
    of photos kept elsewhere and a broken link."""
    photos = root / "photos"
    a, b = touch(photos / "a.png"), touch(photos / "sub" / "b.png")
    touch(root / "elsewhere" / "c.png")
    (photos / "self").symlink_to(".")
    (photos / "sub" / "up").symlink_to("..")
    (photos / "linked").symlink_to(root / "elsewhere")
    (photos / "gone.png").symlink_to(root / "nowhere.png")
    return photos, a, b


def test_folders_follow_symlinked_sub_folders_once_and_say_what_they_skipped(tmp_path):
    photos, a, b = looped_tree(tmp_path)
    inputs = collect([str(photos)])
    assert inputs.files == [a, photos / "linked" / "c.png", b] and not inputs.problems
    assert sorted(inputs.skipped) == [
        (str(photos / "gone.png"), "broken symbolic link"),
        (str(photos / "self"), f"symlink loop back to {photos}"),
        (str(photos / "sub" / "up"), f"symlink loop back to {photos}"),
    ]


def test_a_symlinked_folder_named_explicitly_is_searched(tmp_path):
    photos, _, _ = looped_tree(tmp_path)
    inputs = collect([str(photos / "linked")])
    assert inputs.files == [photos / "linked" / "c.png"] and not inputs.problems and not inputs.skipped


def test_recursive_globs_end_on_symlink_loops(tmp_path):
    photos, a, b = looped_tree(tmp_path)
    inputs = collect([f"{photos}/**/*.png", f"{photos}/**/b.png"])
    assert inputs.files == [a, photos / "linked" / "c.png", b]
    assert (str(photos / "self"), f"symlink loop back to {photos}") in inputs.skipped
    assert (str(photos / "sub" / "up"), f"symlink loop back to {photos}") in inputs.skipped


def test_predict_on_a_glob_over_a_symlink_loop_ends_and_says_what_it_skipped(tmp_path):
    """The real CLI, no server needed: the inputs are collected (and the skips said) before connecting."""
    photos, _, _ = looped_tree(tmp_path)
    for extra in ("x", "y"):  # two loops per folder: without loop detection, 2**40 paths
        (photos / "sub" / extra).symlink_to(photos)
    command = [sys.executable, str(ROOT / "client" / "predict.py"), f"{photos}/**/*.png", "--json"]
    command += ["--url", f"127.0.0.1:{free_port()}", "--retries", "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and result.stdout == ""  # nothing listens: the exit status for the server
    lines = result.stderr.splitlines()
    assert f"note: skipped {photos / 'self'}: symlink loop back to {photos}" in lines
    assert f"note: skipped {photos / 'sub' / 'x'}: symlink loop back to {photos}" in lines
    assert lines[-1].startswith("error: cannot reach Triton at")
