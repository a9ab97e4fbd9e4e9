"""Batch screening of an archive: streamed, resumable, shardable `cxrscreen predict --out FILE`.

- Inputs: image files, folders (searched recursively) and manifests (a ``.csv`` with an ``image`` column,
  paths relative to the csv's folder; other columns are ignored, so an unlabelled archive list works).
- Decoding, preprocessing and the input gate run in DataLoader worker processes (`workers`); the main
  process runs the model on each batch, in input order.
- Output: one row per input, CSV or JSON Lines by the file's suffix (.csv, .jsonl / .ndjson), appended
  batch by batch and flushed + fsync'ed after each batch, so a killed run loses at most the batch in flight.
  A bad file gets a row with its `error` and the run goes on.
- `resume`: the rows already in the output file are kept and their inputs skipped (matched by the `path`
  string, so resume with the same arguments from the same folder); a torn last row (the process was killed
  while writing) is dropped and its input redone. Without `resume` an existing output file is refused.
- `shard` "I/N" (0 <= I < N): this run takes the inputs whose key hashes to I modulo N, the key being the
  input's label (a manifest's ``image`` cell; for a folder argument the folder's name and the path inside
  it; a lone file's name) and the hash the first 8 bytes of its sha1. The N shards are disjoint, together
  cover every input, and do not depend on the machine, the mount point or the order of the inputs, and an
  input keeps its shard when others are added to the archive, so N jobs (a Slurm array, a Kubernetes
  indexed job) split an archive without a coordinator; each writes its own output file.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cxrscreen.errors import CXRError
from cxrscreen.io.csvcell import safe_cell
from cxrscreen.predict.inputs import ImageInput
from cxrscreen.predict.predictor import Predictor, Prepared
from cxrscreen.results.result import PredictionResult
from cxrscreen.results.writers import as_result, csv_cells, csv_columns
from cxrscreen.transforms.preprocess import Geometry, PreprocessConfig, Preprocessor

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


# -- shards

@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): the inputs whose label's stable hash is index modulo count."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """'I/N' -> Shard(I, N); None -> the whole input. CXRError for anything else."""
        if text is None:
            return cls()
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise CXRError(f"--shard takes I/N (e.g. 0/4), not {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise CXRError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
        return cls(i, n)

    @staticmethod
    def key(label: Path) -> int:
        """The stable hash of an input's label (its '/'-separated form)."""
        return int.from_bytes(hashlib.sha1(label.as_posix().encode("utf-8")).digest()[:8], "big")

    def contains(self, item: ImageInput) -> bool:
        return self.count == 1 or self.key(item.label) % self.count == self.index

    def select(self, inputs: Sequence[ImageInput]) -> list[ImageInput]:
        return [i for i in inputs if self.contains(i)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# -- the output file

class ResultWriter:
    """Appends result rows to a CSV or JSON Lines file, flushed and fsync'ed per `write` call.

    `done`: the paths whose rows the file already held when opened with resume=True; `done_errors`: how many
    of those rows record an error.
    """

    def __init__(self, path: str | Path, classes: Sequence[str], *, resume: bool = False) -> None:
        self.path = Path(path)
        fmt = OUTPUT_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise CXRError(f"output format unknown from the suffix {self.path.suffix!r}; use .csv or .jsonl",
                           self.path)
        self.format = fmt
        self.classes = list(classes)
        self.columns = csv_columns(self.classes)  # the one CSV schema (cxrscreen.results.writers)
        self.done: set[str] = set()
        self.done_errors = 0
        existed = self.path.exists()
        if existed and not resume:
            raise CXRError("output file exists; pass --resume to continue it, or choose another --out", self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:
            _lock_exclusively(self._file, self.path)
            kept = self._read_existing() if existed else None
            if kept is not None:
                self._rewrite(kept)  # drops a torn last row, so that appending starts on a clean line
            if not kept and self.format == "csv":
                self._append([self.columns])
        except BaseException:
            self._file.close()
            raise

    def _read_existing(self) -> list[str]:
        """The complete rows of the existing file as text chunks (header first for CSV); fills `done`."""
        try:
            self._file.seek(0)
            text = self._file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CXRError(f"cannot read the output file to resume it ({exc})", self.path) from exc
        text = text[: text.rfind("\n") + 1]  # a row is complete only with its newline
        if self.format == "jsonl":
            kept = []
            for line in text.splitlines(keepends=True):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not isinstance(row, dict) or "path" not in row:
                    raise CXRError("output file holds a line that is no cxrscreen result; not resuming it",
                                   self.path)
                self.done.add(str(row["path"]))
                self.done_errors += bool(row.get("error"))
                kept.append(line)
            return kept
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            return []  # killed before the header was complete: start afresh
        if header != self.columns:
            raise CXRError(f"output file has the columns {','.join(header)}, this model writes "
                           f"{','.join(self.columns)}; resume with the same model or choose another --out", self.path)
        rows = [header]
        try:
            for row in reader:
                if len(row) != len(self.columns):
                    break
                rows.append(row)
                self.done.add(row[0])
                self.done_errors += bool(row[self.columns.index("error")])
        except csv.Error:
            pass  # a quoted field cut off by the kill: that row is redone
        return [_csv_line(r) for r in rows]

    def _rewrite(self, chunks: list[str]) -> None:
        """The file's content becomes `chunks`, in place (same file, under this writer's lock: a file is
        never replaced under another process that has it open)."""
        self._file.seek(0)
        self._file.truncate(0)
        self._file.write("".join(chunks))
        self._file.flush()
        os.fsync(self._file.fileno())

    def _append(self, rows: list[Any]) -> None:
        if self.format == "csv":
            text = "".join(_csv_line(r) for r in rows)
        else:
            text = "".join(json.dumps(r) + "\n" for r in rows)
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def csv_row(self, res: PredictionResult | dict[str, Any]) -> list[str]:
        """A result as CSV cells (the one schema, `results.writers.csv_cells`: text through `safe_cell`)."""
        return csv_cells(res, self.classes)

    def has(self, path: str) -> bool:
        """True if the resumed output already holds the row of input `path` (as its cell is written)."""
        return (safe_cell(path) if self.format == "csv" else path) in self.done

    def open(self) -> None:
        """Opened by the constructor (the `results.writers.ResultSink` protocol)."""

    def write(self, results: Sequence[PredictionResult | dict[str, Any]]) -> None:
        """Append one batch of results and make it durable."""
        if results:
            self._append([self.csv_row(r) for r in results] if self.format == "csv"
                         else [as_result(r).to_dict() for r in results])

    def close(self) -> None:
        self._file.close()


def _lock_exclusively(file: Any, path: Path) -> None:
    """Take an exclusive advisory lock (flock) on an open output file, held until it is closed; CXRError
    when another run holds it (two writers on one file lost rows silently before)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CXRError("another cxrscreen run is writing this output file (it is locked); wait for it to "
                       "finish, or choose another --out", path) from None


def _csv_line(row: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a batch output file (CSV: probabilities as floats, flags as a list) in file order."""
    path = Path(path)
    if OUTPUT_FORMATS.get(path.suffix.lower()) == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            probs = {k[2:]: float(v) for k, v in row.items() if k.startswith("p_") and v != ""}
            out.append({"path": row["path"], "class": row["class"] or None, "probabilities": probs or None,
                        "flags": [x for x in row["flags"].split(";") if x], "error": row["error"] or None,
                        "heatmap": row.get("heatmap") or None})
    return out


# -- decoding in worker processes

@dataclass
class Decoded:
    """One input after a worker: the preprocessed image and geometry, gate flags, or the error."""

    path: str
    image: np.ndarray | None = None
    geometry: Geometry | None = None
    flags: list[str] = field(default_factory=list)
    error: str | None = None


class DecodeDataset(Dataset):
    """Files -> Decoded (read_xray, the run's preprocessing, the gate's flags); never raises for a bad file."""

    def __init__(self, files: Sequence[Path], preprocess: PreprocessConfig, gate: Any = None) -> None:
        self.files = [str(f) for f in files]
        self.preprocess = Preprocessor(preprocess)
        self.gate = gate

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        from cxrscreen.io.xray import read_xray

        path = self.files[i]
        try:
            xray = read_xray(path)
            image, geom = self.preprocess(xray.pixels)
            flags = self.gate.flags(xray) if self.gate is not None else []
        except CXRError as exc:
            return Decoded(path, error=exc.problem)
        except Exception as exc:  # a decoder bug must cost one file, not the archive's run
            return Decoded(path, error=f"cannot decode ({type(exc).__name__}: {exc})")
        return Decoded(path, image=image, geometry=geom, flags=list(flags))


def keep_list(items: list[Decoded]) -> list[Decoded]:
    """DataLoader collate: the batch as the list of Decoded items (images are stacked by the predictor)."""
    return items


def _die_with_parent(parent_pid: int) -> None:
    """In a worker: have the kernel kill it when its parent dies (Linux PR_SET_PDEATHSIG), and exit now if
    the parent is already gone; elsewhere nothing. A killed batch run left ~750 MB workers under PID 1."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def _worker_init(_: int, parent_pid: int | None = None) -> None:
    import cv2
    import torch

    if parent_pid is not None:
        _die_with_parent(parent_pid)

    torch.set_num_threads(1)  # each worker decodes one image at a time; the main process runs the model
    cv2.setNumThreads(1)


def decode_loader(files: Sequence[Path], preprocess: PreprocessConfig, gate: Any, *, batch_size: int,
                  workers: int) -> DataLoader:
    """Batches of Decoded items, in input order, decoded by `workers` processes (0: in this process).

    The workers are spawned, not forked: a fork of a process whose OpenCV or OpenMP thread pools already
    ran (a server, a notebook, a test session) can deadlock in the child's first cv2 call. Spawning costs
    a second or two per run.
    """
    return DataLoader(DecodeDataset(files, preprocess, gate), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=keep_list,
                      worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()) if workers else None,
                      prefetch_factor=2 if workers else None, multiprocessing_context="spawn" if workers else None)


# -- the run

@dataclass
class BatchSummary:
    """What one batch screening run did (earlier_errors: error rows already in the resumed output)."""

    inputs: int
    in_shard: int
    already_done: int
    screened: int
    errors: int
    earlier_errors: int
    seconds: float
    output: str
    shard: str

    @property
    def images_per_s(self) -> float:
        return self.screened / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "images_per_s": round(self.images_per_s, 2)}


def results_of_batch(predictor: Predictor, items: Sequence[Decoded]) -> list[PredictionResult]:
    """Results of one decoded batch, in order: `PredictionResult.failed` for an input that could not be
    decoded, `PredictionResult.withhold` for one the gate (run in the workers) flagged."""
    ok = [it for it in items if it.error is None]
    preps = [Prepared(path=it.path, xray=None, image=it.image, geometry=it.geometry) for it in ok]  # type: ignore[arg-type]
    predicted = iter(predictor.predict_prepared(preps))
    return [PredictionResult.failed(it.path, it.error) if it.error is not None else next(predicted).withhold(it.flags)
            for it in items]


def screen(
    predictor: Predictor,
    inputs: Sequence[ImageInput],
    out_path: str | Path,
    *,
    workers: int = 1,
    resume: bool = False,
    shard: Shard | None = None,
    gate: Any = None,
    progress_factory: Callable[[int], Any] | None = None,
    on_row: Callable[[PredictionResult], None] | None = None,
    problems: Sequence[CXRError] = (),
) -> BatchSummary:
    """Screen `inputs` (this shard's, minus those already in the output when resuming) into `out_path`.

    predictor: its own gate must be None; the gate given here runs in the decode workers.
    progress_factory(total) -> object with update(n) and close(); on_row is called with every written row.
    problems: inputs that could not be read or listed (CXRErrors naming their path): each gets an error row
    (counted in `errors`), unless a resumed output already holds it.
    """
    if predictor.gate is not None:
        raise ValueError("pass the gate to screen(), not to the Predictor (it runs in the decode workers)")
    shard = shard or Shard()
    mine = shard.select(inputs)
    writer = ResultWriter(out_path, predictor.run.classes, resume=resume)
    todo = [i for i in mine if not writer.has(str(i.path))]
    bar = progress_factory(len(todo)) if progress_factory else None
    t0 = time.monotonic()
    errors = 0
    try:
        bad = [PredictionResult.failed(p.path, p.problem) for p in problems if not writer.has(str(p.path))]
        writer.write(bad)
        errors += len(bad)
        predictor.expect(len(todo))  # many inputs: a frozen graph computes the logits
        loader = decode_loader([i.path for i in todo], predictor.run.preprocess, gate,
                               batch_size=predictor.batch_size, workers=workers)
        for items in loader:
            rows = results_of_batch(predictor, items)
            writer.write(rows)
            errors += sum(r.error is not None for r in rows)
            if on_row is not None:
                for r in rows:
                    on_row(r)
            if bar is not None:
                bar.update(len(rows))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return BatchSummary(inputs=len(inputs), in_shard=len(mine), already_done=len(mine) - len(todo),
                        screened=len(todo), errors=errors, earlier_errors=writer.done_errors,
                        seconds=round(time.monotonic() - t0, 3),
                        output=str(out_path), shard=str(shard))

