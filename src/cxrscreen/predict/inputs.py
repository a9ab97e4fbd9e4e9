"""Inputs to predict: files and folders given on the command line, and the output names that mirror them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cxrscreen.io.xray import is_supported_file


def iter_image_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and the image files found recursively in folders (sorted)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from images_in_folder(p)
        else:
            yield p


def images_in_folder(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted."""
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and is_supported_file(f)]


@dataclass(frozen=True)
class ImageInput:
    """One file to predict and its label: the relative path that names its outputs (a file given alone:
    its name; a file found in a folder argument: the folder's name and the path inside it)."""

    path: Path
    label: Path


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[ImageInput], list[Path]]:
    """(the files to predict, the folder arguments that hold no image file)."""
    files: list[ImageInput] = []
    empty: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = images_in_folder(p)
            if not found:
                empty.append(p)
            top = Path(p.resolve().name)
            files += [ImageInput(f, top / f.relative_to(p)) for f in found]
        else:
            files.append(ImageInput(p, Path(p.name or "input")))
    return files, empty


class OutputNames:
    """Unique output paths under one folder: `<folder>/<label's folders>/<stem>_<tag>.png`, mirroring each
    input's label; a path already handed out in this run gets `_2`, `_3`, ... before the tag."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._used: set[Path] = set()

    def path(self, label: Path, tag: str) -> Path:
        """A fresh path for `label`'s output `tag` (its folder is created)."""
        folder = self.root / label.parent
        stem = label.stem or "input"
        out, n = folder / f"{stem}_{tag}.png", 1
        while out in self._used:
            n += 1
            out = folder / f"{stem}_{n}_{tag}.png"
        self._used.add(out)
        folder.mkdir(parents=True, exist_ok=True)
        return out

