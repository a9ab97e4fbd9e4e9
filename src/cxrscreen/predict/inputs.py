"""Inputs to predict: files and folders given on the command line, and the output names that mirror them."""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cxrscreen.errors import CXRError
from cxrscreen.io.xray import is_supported_file

T = TypeVar("T")
R = TypeVar("R")
READ_AHEAD = 32
"""Most inputs `read_ahead` holds ready beyond the one being consumed (the predictor passes its batch size: while
the model runs one batch the next is decoded, and at most two batches of decoded X-rays are held)."""


def iter_image_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and the image files found recursively in folders (sorted)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from images_in_folder(p)
        else:
            yield p


@dataclass
class FolderScan:
    """What a folder holds: `files` (supported images, sorted), `problems` (entries that could not be
    read: a folder without permission, a symlink loop, a dangling link; each CXRError names its path) and
    `skipped` (files that are no supported image: `.gif`, `.txt`, a suffix-less file that is no DICOM)."""

    files: list[Path] = field(default_factory=list)
    problems: list[CXRError] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def scan_folder(folder: Path) -> FolderScan:
    """Walk `folder` recursively (symlinked folders followed once: a loop is a problem, not a hang) and sort
    what it holds into a :class:`FolderScan`. Nothing is dropped silently."""
    scan = FolderScan()
    try:
        root = os.stat(folder)
    except OSError as exc:
        scan.problems.append(CXRError(f"cannot read folder ({exc.strerror or exc})", folder))
        return scan
    _walk(Path(folder), {(root.st_dev, root.st_ino)}, scan)
    scan.files.sort()
    scan.skipped.sort()
    return scan


def _walk(folder: Path, seen: set[tuple[int, int]], scan: FolderScan) -> None:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        scan.problems.append(CXRError(f"cannot read folder ({exc.strerror or exc}); its images were not "
                                      "screened", folder))
        return
    for entry in entries:
        path = folder / entry.name
        try:
            st = os.stat(path)  # follows links
        except OSError as exc:
            if entry.is_symlink():
                what = "symlink loop" if _is_loop(exc) else "dangling link (its target does not exist)"
                scan.problems.append(CXRError(f"{what}; not screened", path))
            else:
                scan.problems.append(CXRError(f"cannot read ({exc.strerror or exc}); not screened", path))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                scan.problems.append(CXRError("symlink loop (a folder that contains itself); not followed", path))
                continue
            _walk(path, seen | {key}, scan)
        elif not stat.S_ISREG(st.st_mode):
            scan.problems.append(CXRError("not a regular file (FIFO, device or socket); not screened", path))
        elif is_supported_file(path):  # a suffix-less file counts when it starts like DICOM
            scan.files.append(path)
        else:
            scan.skipped.append(path)


def _is_loop(exc: OSError) -> bool:
    import errno

    return exc.errno == errno.ELOOP


def images_in_folder(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted."""
    return scan_folder(folder).files


@dataclass(frozen=True)
class ImageInput:
    """One file to predict and its label: the relative path that names its outputs (a file given alone:
    its name; a file found in a folder argument: the folder's name and the path inside it)."""

    path: Path
    label: Path


def manifest_inputs(csv_path: Path) -> list[ImageInput]:
    """The images of a manifest csv (an ``image`` column, paths relative to the csv's folder or absolute),
    labelled by their ``image`` cell made relative (`safe_label`)."""
    from cxrscreen.data.manifest import check_columns, read_csv_strings

    df = read_csv_strings(csv_path)
    check_columns(df, ["image"], csv_path)
    root = csv_path.parent
    return [ImageInput(root / img, safe_label(img)) for img in df["image"] if img]


@dataclass
class Gathered:
    """Everything the command-line inputs name: `inputs` to predict, folder arguments without any image
    (`empty`), `problems` (inputs that could not be read or listed: each a CXRError naming its path; they
    count as failed inputs and never stop the others) and `skipped` (files in folders that are no
    supported image: reported as a count)."""

    inputs: list[ImageInput] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)
    problems: list[CXRError] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def gather(paths: Iterable[str | Path]) -> Gathered:
    """Files, folders (searched recursively) and manifest ``.csv`` files (an ``image`` column): one bad
    argument (an unreadable folder, a csv that is no manifest) becomes a problem, the others go on."""
    out = Gathered()
    for item in paths:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            try:
                out.inputs += manifest_inputs(p)
            except CXRError as exc:
                out.problems.append(exc if exc.path else CXRError(exc.problem, p))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                out.problems.append(CXRError(f"cannot read this manifest ({exc})", p))
        elif p.is_dir():
            scan = scan_folder(p)
            if not scan.files and not scan.problems:
                out.empty.append(p)
            top = Path(p.resolve().name)
            out.inputs += [ImageInput(f, top / f.relative_to(p)) for f in scan.files]
            out.problems += scan.problems
            out.skipped += scan.skipped
        else:
            out.inputs.append(ImageInput(p, Path(p.name or "input")))
    return out


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


def safe_label(label: str | Path) -> Path:
    """`label` as a relative path without "." or ".." parts (an absolute one loses its anchor: "/data/a/b.png"
    -> "data/a/b.png"; "../../x.png" -> "x.png"): output paths built from it stay inside their folder."""
    p = Path(label)
    parts = [x for x in (p.parts[1:] if p.anchor else p.parts) if x not in (".", "..")]
    return Path(*parts) if parts else Path("input")


class OutputNames:
    """Unique output paths under one folder: `<folder>/<label's folders>/<stem>_<tag>.png`, mirroring each
    input's label; a path already handed out in this run gets `_2`, `_3`, ... before the tag."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._used: set[Path] = set()

    def path(self, label: Path, tag: str) -> Path:
        """A fresh path for `label`'s output `tag` (its folder is created), always inside the root: an absolute
        label loses its anchor and ".." parts are dropped, so no label writes beside its input or elsewhere."""
        label = safe_label(label)
        folder = self.root / label.parent
        stem = label.stem or "input"
        out, n = folder / f"{stem}_{tag}.png", 1
        while out in self._used:
            n += 1
            out = folder / f"{stem}_{n}_{tag}.png"
        self._used.add(out)
        folder.mkdir(parents=True, exist_ok=True)
        return out



_DONE = object()


def read_ahead(items: Iterable[T], fn: Callable[[T], R], *, depth: int = READ_AHEAD
               ) -> Iterator[tuple[T, R | CXRError]]:
    """(item, fn(item)) for each item, in order, with `fn` run by one background thread up to `depth` items ahead
    of the consumer: files are decoded and preprocessed while the model runs on the previous batch (the decoders
    of Pillow, OpenCV and numpy release the GIL). A CXRError raised by `fn` is yielded in place of the result (a
    bad file never stops the others); any other exception is raised in the consumer. Closing the iterator early
    stops the thread."""
    out: queue.Queue[tuple[Any, Any, BaseException | None]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[Any, Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                try:
                    entry: tuple[Any, Any, BaseException | None] = (item, fn(item), None)
                except CXRError as exc:
                    entry = (item, exc, None)
                if not put(entry):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((None, None, exc))
            return
        put((_DONE, None, None))

    worker = threading.Thread(target=work, name="cxrscreen-reader", daemon=True)
    worker.start()
    try:
        while True:
            item, result, error = out.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item, result
    finally:
        stop.set()
        worker.join(timeout=5)
