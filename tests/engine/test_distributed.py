"""Distributed training: 2 torchrun processes on the CPU (gloo) write the single-process run directory,
are killed mid-run and resume, and the result loads, evaluates and matches a 1-process run's keys/shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxrscreen.engine.distributed import DistributedEpochSampler, torchrun_command
from cxrscreen.evaluation.evaluate import evaluate_run
from cxrscreen.runs.run_dir import load_run
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train
from tests.distributed_data import write_synthetic_dataset
from tests.processes import kill_tree

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6


def _recipe(tmp: Path) -> dict:
    return {"arch": "mobilenet_v3_small", "epochs": EPOCHS, "batch_size": 8, "lr": 1e-3, "linear_probe_epochs": 1,
            "max_train_images_per_epoch": 32, "threads": 1, "patience": EPOCHS, "cache_dir": str(tmp / "cache"),
            "preprocess": {"image_size": 64}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_sampler_shares_one_order_without_overlap() -> None:
    base = list(torch.randperm(23, generator=torch.Generator().manual_seed(0)))
    parts = [list(DistributedEpochSampler(base, r, 3)) for r in range(3)]  # type: ignore[arg-type]
    assert [len(p) for p in parts] == [7, 7, 7]
    assert sorted(int(i) for p in parts for i in p) == sorted(int(i) for i in base[:21])


@pytest.mark.slow
def test_two_processes_train_resume_and_match_a_single_process_run(tmp_path: Path) -> None:
    data, split = write_synthetic_dataset(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(_recipe(tmp_path)))  # JSON is YAML
    run2 = tmp_path / "run2"
    cmd = torchrun_command(2, ["--data", str(data), "--split", str(split), "--out", str(run2),
                               "--config", str(recipe)])
    # first attempt: SIGKILL the whole job as soon as one epoch's checkpoint is on disk
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (run2 / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)
    output = proc.communicate()[0]
    assert (run2 / "checkpoint.pt").is_file(), output
    config = json.loads((run2 / "config.json").read_text())
    assert not config.get("finished"), "the run ended before it was killed: nothing was resumed"
    done = torch.load(run2 / "checkpoint.pt", weights_only=False)["epoch"]
    assert 1 <= done < EPOCHS

    # second attempt: resumes from that checkpoint and finishes
    res = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming {run2} after epoch {done}" in res.stdout + res.stderr
    assert (res.stdout + res.stderr).count("completed all epochs") == 1  # rank 0 alone logs
    config = json.loads((run2 / "config.json").read_text())
    assert config["finished"] and config["distributed"] == {"world_size": 2, "backend": "gloo"}
    hist = pd.read_csv(run2 / "history.csv")
    assert list(hist["epoch"]) == list(range(1, EPOCHS + 1))
    assert (hist["train_images"] == 32).all()  # 16 per process, summed
    assert list(hist["stage"])[:2] == ["linear_probe", "fine_tune"]

    # the same recipe in one process
    run1 = tmp_path / "run1"
    train(TrainConfig.from_yaml(recipe), data, split, run1, log=lambda _: None)

    w1, w2 = load_file(str(run1 / "model.safetensors")), load_file(str(run2 / "model.safetensors"))
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    c1 = json.loads((run1 / "config.json").read_text())
    assert set(c1) == set(config) - {"distributed"}
    assert c1["training"] == config["training"]
    k1 = torch.load(run1 / "checkpoint.pt", weights_only=False)
    k2 = torch.load(run2 / "checkpoint.pt", weights_only=False)
    assert set(k1) == set(k2) and k2["epoch"] == EPOCHS and set(k1["model"]) == set(k2["model"])

    loaded = load_run(run2)
    result = evaluate_run(loaded, data, split_csv=split, subset="val", n_boot=20)
    assert result["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0


def test_train_nproc_launches_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cxrscreen train --nproc 2` hands the same arguments to torchrun (without --nproc)."""
    from typer.testing import CliRunner

    import cxrscreen.engine.distributed as dist_mod
    from cxrscreen.cli import app

    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    seen: list[list[str]] = []
    monkeypatch.setattr(dist_mod, "launch_torchrun", lambda n, args: seen.append(torchrun_command(n, args)) or 3)
    res = CliRunner().invoke(app, ["train", "--data", "d", "--split", "s.csv", "--out", "r", "--arch", "resnet18",
                                   "--epochs", "2", "--nproc", "2", "--no-clahe"])
    assert res.exit_code == 3, res.output
    assert seen == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                     "cxrscreen.training", "--data", "d", "--split", "s.csv", "--out", "r", "--arch", "resnet18",
                     "--epochs", "2", "--no-clahe"]]
