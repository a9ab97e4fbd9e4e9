"""`train()` for every task: data from a manifest + split, the task's recipe, the one epoch loop, resume.

`train(TrainConfig(...), data_dir, split_csv, out_dir)` writes a run directory (`runs.run_dir`): the
architecture's registry kind names the training task (`cxrscreen.training.tasks`) that builds the model,
batches, loss and validation. A checkpoint is written after every epoch; calling `train` again on the same
directory with the same configuration continues from it, and a finished run is not trained again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrscreen import CLASSES
from cxrscreen.data.manifest import manifest_hash
from cxrscreen.data.subsets import SubsetData, load_train_val
from cxrscreen.engine import distributed
from cxrscreen.engine.loop import EpochLoop
from cxrscreen.engine.setup import setup_run
from cxrscreen.io.files import file_sha256
from cxrscreen.models.registry import count_parameters, get_spec
from cxrscreen.runs.run_dir import read_config, run_config, write_config
from cxrscreen.training.config import TrainConfig, stored_run
from cxrscreen.training.tasks import TrainContext, training_for


def run_base_config(
    cfg: TrainConfig, kind: str, classes: list[str], data_dir: Path, split_csv: Path, tr: SubsetData, va: SubsetData
) -> dict[str, Any]:
    """The config.json fields every trained run shares (`runs.run_dir.run_config`), with the data: manifest
    and split hashes, image counts, skipped files."""
    return run_config(kind=kind, arch=cfg.arch, classes=classes, preprocess=cfg.preprocess, training=cfg.to_dict(),
                      seed=cfg.seed, data={
                          "manifest": str(data_dir),
                          "manifest_sha256": manifest_hash(data_dir),
                          "split": str(split_csv),
                          "split_sha256": file_sha256(split_csv),
                          "train_images": int(len(tr.labels)),
                          "val_images": int(len(va.labels)),
                          "skipped_files": {**tr.errors, **va.errors},
                      })


def train(
    cfg: TrainConfig,
    data_dir: Path,
    split_csv: Path,
    out_dir: Path,
    *,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Train the model `cfg.arch` names and write its run directory. Returns the final config dict.

    progress_factory(description, total) -> object with .update(n) and .close() (e.g. a rich bar).
    """
    data_dir, split_csv, out_dir = Path(data_dir), Path(split_csv), Path(out_dir)
    kind = get_spec(cfg.arch).kind
    task = training_for(kind)
    task.check_config(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ddp = distributed.context(cfg.device)  # under torchrun: join the process group (one process: no-op)
    if not ddp.is_main:
        log, progress_factory = (lambda _msg: None), None  # rank 0 alone logs and shows progress
    if (old := stored_run(cfg, out_dir, log)) is not None:
        return old
    device, cache = setup_run(cfg)
    device = ddp.device(device)
    classes = list(CLASSES)

    def bar(desc: str, total: int) -> Any:
        return progress_factory(desc, total) if progress_factory else None

    tr, va = load_train_val(data_dir, split_csv, cache, classes, bar=bar, log=log)
    log(f"train {len(tr.labels)} images {np.bincount(tr.labels, minlength=3).tolist()}, "
        f"val {len(va.labels)} images {np.bincount(va.labels, minlength=3).tolist()} ({', '.join(classes)}); "
        f"cache hits {cache.hits}, decoded {cache.misses}")
    generator = torch.Generator().manual_seed(cfg.seed)
    recipe = task.recipe(TrainContext(cfg=cfg, train=tr, val=va, classes=classes, device=device,
                                      generator=generator, data_dir=data_dir, out_dir=out_dir, log=log, ddp=ddp))
    loop = EpochLoop(cfg, recipe, generator, device, out_dir=out_dir, has_val=len(va.labels) > 0, log=log,
                     progress=progress_factory, ddp=ddp)
    loop.resume()
    ddp.check_same(loop.start_epoch, "the epoch to resume at")
    base_config: dict[str, Any] = {
        **run_base_config(cfg, kind, classes, data_dir, split_csv, tr, va),
        **recipe.config,
        "parameters": count_parameters(recipe.model),
        "finished": False,
    }
    if ddp.enabled:
        base_config["distributed"] = ddp.info()
    if ddp.is_main:
        write_config(out_dir, {**read_config(out_dir), **base_config} if loop.ckpt_path.is_file() else base_config)
    ddp.barrier()
    return loop.run()
