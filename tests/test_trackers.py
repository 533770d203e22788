"""Issue 14: trackers through Accelerate (``train.log_with``), offline: TensorBoard's events
hold the logged scalars, W&B in offline mode (where it installs) records the same, and a
tracker that is not installed is named with its key before anything loads."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import REPO, tiny_overrides

from distill import config as config_lib
from distill import train

RECIPE = str(REPO / "recipes" / "digits-dmd2-1step.yaml")


def _losses(run) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def test_tensorboard_by_default_holds_the_logged_scalars_and_the_samples(tiny_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train.main([RECIPE, *tiny_overrides(tiny_teacher, None, run, **{"train.max_steps": 2})])
    events = sorted((run / "logs").rglob("events.out.tfevents.*"))
    accumulators = [EventAccumulator(str(e.parent)).Reload() for e in events]
    scalars = {tag: [s.value for s in a.Scalars(tag)] for a in accumulators for tag in a.Tags()["scalars"]}
    rows = _losses(run)
    assert scalars["generator/dmd_loss"] == pytest.approx([r["generator/dmd_loss"] for r in rows], rel=1e-6)
    assert scalars["critic/denoising_loss"] == pytest.approx([r["critic/denoising_loss"] for r in rows], rel=1e-6)
    assert any("samples" in a.Tags()["images"] for a in accumulators)


def test_w_and_b_offline_records_the_same_losses(tiny_teacher, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional tracker: pip install wandb (it installs from PyPI here)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train.main([RECIPE, *tiny_overrides(tiny_teacher, None, run, **{"train.max_steps": 2, "train.log_with": "[wandb]"})])
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not (run / "logs").exists()  # W&B alone: no TensorBoard events
    records = _wandb_records(next(runs[0].glob("run-*.wandb")))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = _losses(run)
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == [1, 2]
    assert [h["generator/dmd_loss"] for h in history] == pytest.approx([r["generator/dmd_loss"] for r in rows], rel=1e-6)
    assert all(h["samples/_type"] == "images/separated" for h in history)  # the sample grid, as an image
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["train.max_steps"] == 2 and config["seed"] == 0  # the recipe as hyperparameters


def _wandb_records(path) -> list:
    """The protobuf records of an offline W&B run file: a LevelDB log (32 KiB blocks of
    [crc u32, length u16, type u8] chunks) after W&B's 7-byte header; read here because the
    offline summary file is written only by ``wandb sync``."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, chunks, records = path.read_bytes(), 32768, 7, [], []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == kind == 0:
            break
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_a_tracker_that_is_not_installed_is_named_with_its_key(tiny_teacher, tmp_path):
    import accelerate.utils

    missing = [n for n in ("aim", "mlflow", "comet_ml", "clearml") if not getattr(accelerate.utils, f"is_{n}_available")()]
    if not missing:
        pytest.skip("every tracker is installed here")
    overrides = [f"teacher.path={tiny_teacher}", "eval.features=[]", "eval.classifier=null", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(config_lib.ConfigError, match=rf"train.log_with: '{missing[0]}' is not installed here \(pip install "):
        config_lib.load(None, [*overrides, f"train.log_with=[tensorboard,{missing[0]}]"])
    with pytest.raises(config_lib.ConfigError, match=r"train.log_with: unknown tracker 'neptune'; Accelerate's are aim, "):
        config_lib.load(None, [*overrides, "train.log_with=[neptune]"])
    assert config_lib.load(None, [*overrides, "train.log_with=[]"]).train.log_with == []


def test_a_tracker_that_cannot_start_ends_in_one_line_naming_the_key_and_the_recipe(tiny_teacher, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional tracker")
    from distill import cli

    wandb.teardown()  # W&B keeps its settings per process: forget an earlier test's offline mode

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: W&B online has no login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", RECIPE, *tiny_overrides(tiny_teacher, None, tmp_path / "run",
                                                   **{"train.max_steps": 1, "train.log_with": "[wandb]"})])
    message = str(exit.value)
    assert message.startswith(f"distill: {RECIPE}: train.log_with: the trackers ['wandb'] did not start (UsageError: ")
    assert "WANDB_MODE=offline" in message
