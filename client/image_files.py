"""Turning command-line arguments (files, folders, globs) into the list of images to classify.

A file named explicitly is always sent, whatever its suffix (the server or the
decoder says whether it is an image); inside folders only files with an image
suffix are taken, so a README next to the pictures is not reported as a failure.
Arguments that match nothing are reported, not silently dropped.

Folders and ``**`` globs are walked here rather than by :mod:`glob` or
:meth:`pathlib.Path.rglob`: symbolic links to folders are followed, and a folder
reached a second time (a symlink loop, or two links to one folder) is skipped and
said so, recognised by the ``(st_dev, st_ino)`` of the resolved directory. A glob
over a folder that links back to itself therefore ends, and a linked folder of
photos is not silently left out.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from threegnet_preprocessing import IMAGE_SUFFIXES


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (argument, what is wrong)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was not searched)


class _Walk:
    """One loop-safe traversal: every directory is entered at most once."""

    def __init__(self, skipped: list[tuple[str, str]]) -> None:
        self.seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of a resolved directory -> first path
        self.skipped = skipped

    def enter(self, directory: str, report: bool = True) -> bool:
        """Whether ``directory`` is new to this walk; a repeat is recorded as skipped (if ``report``)."""
        try:
            st = os.stat(directory)  # follows symlinks: the directory itself
        except OSError as e:
            self.skipped.append((directory, f"cannot read: {e.strerror or e}"))
            return False
        key = (st.st_dev, st.st_ino)
        first = self.seen.get(key)
        if first is None:
            self.seen[key] = directory
            return True
        if not report:
            return False
        inside = os.path.commonpath([os.path.abspath(first), os.path.abspath(directory)]) == os.path.abspath(first)
        why = f"symlink loop back to {first}" if inside else f"same folder as {first}, already searched"
        self.skipped.append((directory, why))
        return False

    def entries(self, directory: str) -> list[os.DirEntry]:
        try:
            with os.scandir(directory or ".") as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.skipped.append((directory, f"cannot read: {e.strerror or e}"))
            return []

    def subdirs(self, directory: str) -> Iterator[str]:
        """Visible sub-folders (symlinked ones too) not yet entered, entering them."""
        for entry in self.entries(directory):
            if entry.name.startswith(".") or not _is_dir(entry):
                continue
            path = os.path.join(directory, entry.name)
            if self.enter(path):
                yield path


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _images_under(folder: Path, walk: _Walk) -> list[Path]:
    """Image files under ``folder`` (recursive, symlinked folders followed once, hidden names left out).
    A ``folder`` that ``walk`` has already searched gives nothing, silently (a glob matched it and a parent)."""
    found: list[Path] = []
    skipped = walk.skipped
    if not walk.enter(str(folder), report=False):
        return []
    pending = [str(folder)]
    while pending:
        directory = pending.pop()
        for entry in walk.entries(directory):
            if entry.name.startswith("."):
                continue
            path = os.path.join(directory, entry.name)
            if _is_dir(entry):
                if walk.enter(path):
                    pending.append(path)
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                if entry.is_file():
                    found.append(Path(path))
                elif entry.is_symlink():
                    skipped.append((path, "broken symbolic link"))
    return sorted(found)


def _split(pattern: str) -> tuple[str, list[str]]:
    """``pattern`` as (its fixed leading folder, the remaining segments)."""
    drive = os.sep if os.path.isabs(pattern) else ""
    segments = [s for s in pattern.split(os.sep) if s]
    fixed = []
    while segments and not glob.has_magic(segments[0]) and len(segments) > 1:
        fixed.append(segments.pop(0))
    return drive + os.path.join(*fixed) if fixed else drive, segments


def _match(base: str, segments: list[str], skipped: list[tuple[str, str]]) -> Iterator[str]:
    """Paths under ``base`` matching ``segments`` as :func:`glob.glob` with ``recursive=True`` would,
    except that a ``**`` enters every folder at most once (each ``**`` has its own :class:`_Walk`)."""
    if not segments:
        yield base
        return
    segment, rest = segments[0], segments[1:]
    if segment == "**":
        walk = _Walk(skipped)
        if not walk.enter(base or "."):
            return
        folders, pending = [base], [base]
        while pending:
            for sub in walk.subdirs(pending.pop()):
                folders.append(sub)
                pending.append(sub)
        for folder in folders:
            if rest:
                yield from _match(folder, rest, skipped)
                continue
            if folder:
                yield folder
            for entry in walk.entries(folder):
                if not entry.name.startswith(".") and not _is_dir(entry):
                    yield os.path.join(folder, entry.name)
        return
    if not glob.has_magic(segment):
        path = os.path.join(base, segment)
        if os.path.lexists(path) and (not rest or os.path.isdir(path)):
            yield from _match(path, rest, skipped)
        return
    hidden_ok = segment.startswith(".")
    for entry in _Walk(skipped).entries(base):
        if (hidden_ok or not entry.name.startswith(".")) and fnmatch.fnmatchcase(entry.name, segment):
            if rest and not _is_dir(entry):
                continue
            yield from _match(os.path.join(base, entry.name), rest, skipped)


def _glob(pattern: str, skipped: list[tuple[str, str]]) -> list[Path]:
    base, segments = _split(pattern)
    if not segments:
        return [Path(base)] if os.path.lexists(base) else []
    return sorted({Path(p) for p in _match(base, segments, skipped)})


def _expand(argument: str, skipped: list[tuple[str, str]]) -> tuple[list[Path], str | None]:
    path = Path(argument)
    if path.is_file():
        return [path], None
    if path.is_dir():  # also a symbolic link to a folder, named explicitly: followed
        found = _images_under(path, _Walk(skipped))
        return found, None if found else f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder"
    if glob.has_magic(argument):
        matches, walk = _glob(argument, skipped), _Walk(skipped)
        files = [f for m in matches for f in ([m] if m.is_file() else _images_under(m, walk) if m.is_dir() else [])]
        return files, None if files else "no file matches this pattern"
    if path.is_symlink():
        return [], "broken symbolic link"
    if path.exists():
        return [], "not a regular file or folder"
    return [], "no such file or folder"


def collect(arguments: Iterable[str]) -> Inputs:
    """Files in argument order (folders and globs sorted), each once; what was not searched in ``skipped``."""
    inputs, seen = Inputs(), set()
    for argument in arguments:
        skipped: list[tuple[str, str]] = []
        files, problem = _expand(argument, skipped)
        if problem:
            inputs.problems.append((argument, problem))
        for item in skipped:
            if item not in inputs.skipped:
                inputs.skipped.append(item)
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                inputs.files.append(f)
    return inputs
