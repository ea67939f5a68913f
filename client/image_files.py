"""Turning command-line arguments (files, folders, globs) into the list of images to classify.

A file named explicitly is always sent, whatever its suffix (the server or the
decoder says whether it is an image); inside folders only files with an image
suffix are taken, so a README next to the pictures is not reported as a failure.
Arguments that match nothing are reported, not silently dropped.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from threegnet_preprocessing import IMAGE_SUFFIXES


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (argument, what is wrong)


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _expand(argument: str) -> tuple[list[Path], str | None]:
    path = Path(argument)
    if path.is_file():
        return [path], None
    if path.is_dir():
        found = _images_under(path)
        return found, None if found else f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder"
    if glob.has_magic(argument):
        matches = sorted(Path(m) for m in glob.glob(argument, recursive=True))
        files = [f for m in matches for f in ([m] if m.is_file() else _images_under(m) if m.is_dir() else [])]
        return files, None if files else "no file matches this pattern"
    if path.exists():
        return [], "not a regular file or folder"
    return [], "no such file or folder"


def collect(arguments: Iterable[str]) -> Inputs:
    """Files in argument order (folders and globs sorted), each once."""
    inputs, seen = Inputs(), set()
    for argument in arguments:
        files, problem = _expand(argument)
        if problem:
            inputs.problems.append((argument, problem))
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                inputs.files.append(f)
    return inputs
