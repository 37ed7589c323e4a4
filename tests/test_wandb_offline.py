"""Read back real wandb offline runs, and the media logged from a Lightning Trainer."""

from __future__ import annotations

import shutil
import struct
import types
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import wandb
from matplotlib.figure import Figure
from wandb.proto import wandb_internal_pb2 as pb

from curvlightning.logging.wandb_media import (
    log_histograms,
    log_image,
    log_line_plot,
    wandb_loggers,
)
from curvlightning.logging.wandb_offline import (
    BLOCK_SIZE,
    WandbRunFileError,
    find_run_files,
    histogram_keys,
    read_histograms,
    read_history,
    read_records,
)

NUM_STEPS = 400
HISTOGRAM_STEPS = (0, 150, 399)
BIG_STRING = "curvature" * 8000  # 72,000 characters: a record over three blocks


def _set_offline_env(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def _logged_data() -> tuple[dict[int, dict], dict[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    scalars = {
        step: {"loss": float(rng.normal()), "curv": {"trace": float(rng.exponential())}}
        for step in range(NUM_STEPS)
    }
    samples = {step: rng.normal(size=500 + step) for step in HISTOGRAM_STEPS}
    return scalars, samples


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished offline run with scalars, nested keys, histograms, a big record."""
    root = tmp_path_factory.mktemp("wandb_run")
    scalars, samples = _logged_data()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _set_offline_env(monkeypatch, root)
        run = wandb.init(mode="offline", dir=root, project="curv")
        for step, row in scalars.items():
            media = {"hist": wandb.Histogram(samples[step])} if step in samples else {}
            run.log({**row, **media}, step=step)
        run.log({"big": BIG_STRING}, step=NUM_STEPS)
        run.finish()
    (path,) = find_run_files(root)
    return path, scalars, samples


def test_run_file_spans_blocks(offline_run):
    path, _, _ = offline_run
    assert path.name.startswith("run-") and path.parent.name.startswith("offline-run-")
    assert path.stat().st_size > 3 * BLOCK_SIZE


def test_every_scalar_and_step_read_back(offline_run):
    path, scalars, _ = offline_run
    rows = [row for row in read_history(path) if "loss" in row]
    assert [row["_step"] for row in rows] == list(range(NUM_STEPS))
    for row in rows:
        expected = scalars[row["_step"]]
        assert row["loss"] == expected["loss"]
        assert row["curv/trace"] == expected["curv"]["trace"]


def test_record_over_three_blocks_read_back(offline_run):
    path, _, _ = offline_run
    (row,) = [row for row in read_history(path) if "big" in row]
    assert row["big"] == BIG_STRING and row["_step"] == NUM_STEPS


def test_histograms_match_numpy(offline_run):
    path, _, samples = offline_run
    assert histogram_keys(read_history(path)) == ["hist"]
    histograms = read_histograms(path, "hist")
    assert [h.step for h in histograms] == list(HISTOGRAM_STEPS)
    for step, bins, values in histograms:
        expected_values, expected_bins = np.histogram(samples[step], bins=64)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(bins, expected_bins)


def test_records_include_run_and_exit(offline_run):
    path, _, _ = offline_run
    kinds = [record.WhichOneof("record_type") for record in read_records(path)]
    assert kinds[0] == "header" and "run" in kinds and "exit" in kinds


def test_find_run_files_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        find_run_files(tmp_path / "absent")


def test_not_a_wandb_file(tmp_path):
    path = tmp_path / "run-fake.wandb"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a run" * 10)
    with pytest.raises(WandbRunFileError, match="is not a wandb run file: it starts"):
        read_history(path)


def test_file_shorter_than_header(tmp_path):
    path = tmp_path / "run-empty.wandb"
    path.write_bytes(b":W&")
    with pytest.raises(WandbRunFileError, match="holds 3 bytes, fewer than the 7-byte"):
        list(read_records(path))


def test_unknown_version(tmp_path):
    path = tmp_path / "run-v9.wandb"
    path.write_bytes(struct.pack("<4sHB", b":W&B", 0xBEE1, 9))
    with pytest.raises(WandbRunFileError, match="format version 9, but this reader"):
        list(read_records(path))


def test_damaged_byte_fails_checksum(offline_run, tmp_path):
    path = tmp_path / "run-damaged.wandb"
    data = bytearray(offline_run[0].read_bytes())
    data[BLOCK_SIZE + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WandbRunFileError, match="has checksum 0x.*The file is damaged"):
        read_history(path)


def test_truncated_file_warns_and_keeps_complete_records(offline_run, tmp_path):
    path = tmp_path / "run-cut.wandb"
    shutil.copyfile(offline_run[0], path)
    with path.open("r+b") as stream:
        stream.truncate(2 * BLOCK_SIZE + 1000)
    with pytest.warns(RuntimeWarning, match="ends inside"):
        rows = read_history(path)
    steps = [row["_step"] for row in rows if "loss" in row]
    assert steps == list(range(len(steps))) and 0 < len(steps) < NUM_STEPS


# A writer of the LevelDB log layout, to pin every block-boundary case.


def _fragment(kind: int, data: bytes) -> bytes:
    checksum = zlib.crc32(data, zlib.crc32(bytes([kind])))
    return struct.pack("<IHB", checksum, len(data), kind) + data


def _log_file(payloads: list[bytes]) -> bytes:
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < 7:
                out += bytes(left)
                continue
            chunk, rest = rest[: left - 7], rest[left - 7 :]
            kind = (1 if first else 4) if not rest else (2 if first else 3)
            out += _fragment(kind, chunk)
            first = False
            if not rest:
                break
    return bytes(out)


def _history_payload(step: int, size: int) -> bytes:
    """A serialized history record of exactly ``size`` bytes."""
    filler = 0
    for _ in range(10):
        record = pb.Record()
        record.history.item.add(key="x", value_json='"' + "a" * filler + '"')
        record.history.item.add(key="_step", value_json=str(step))
        payload = record.SerializeToString()
        if len(payload) == size:
            return payload
        filler += size - len(payload)
    raise AssertionError(f"cannot build a payload of {size} bytes")


@pytest.mark.parametrize("tail", range(9))
def test_block_tails(tmp_path, tail):
    """A first record leaves ``tail`` bytes in block one; then a long record."""
    first_size = BLOCK_SIZE - 7 - 7 - tail
    payloads = [_history_payload(0, first_size), _history_payload(1, 2 * BLOCK_SIZE)]
    payloads += [_history_payload(step, 50) for step in range(2, 6)]
    path = tmp_path / "run-synthetic.wandb"
    path.write_bytes(_log_file(payloads))
    rows = read_history(path)
    assert [row["_step"] for row in rows] == list(range(6))
    assert len(rows[1]["x"]) > BLOCK_SIZE


@pytest.mark.parametrize(
    ("keep", "where", "steps"),
    [
        (lambda data: data[:-3], "inside an incomplete fragment at byte", [0]),
        (lambda data: data + b"\0\0\0", "inside an incomplete fragment", [0, 1]),
        (lambda data: data[:BLOCK_SIZE], "inside a record that spans blocks", [0]),
    ],
)
def test_cut_files_warn_once(tmp_path, keep, where, steps):
    payloads = [_history_payload(0, 50), _history_payload(1, 2 * BLOCK_SIZE)]
    path = tmp_path / "run-cut.wandb"
    path.write_bytes(keep(_log_file(payloads)))
    with pytest.warns(RuntimeWarning, match=where) as record:
        rows = read_history(path)
    assert len(record) == 1
    assert [row["_step"] for row in rows] == steps


def test_out_of_order_fragment(tmp_path):
    payload = _history_payload(0, 100)
    path = tmp_path / "run-order.wandb"
    path.write_bytes(_log_file([]) + _fragment(4, payload))
    with pytest.raises(WandbRunFileError, match="out of order: no record was started"):
        read_history(path)


# Media logged through Lightning's WandbLogger.


class _TinyModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _MediaCallback(pl.Callback):
    def __init__(self):
        self.dropped = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weight = pl_module.layer.weight.detach().clone()
        weight[0, 0] = float("nan")
        tensors = {"param/weight": weight, "param/empty": torch.empty(0)}
        self.dropped.append(log_histograms(trainer, tensors, trainer.global_step))
        xs, ys = [0.0, 1.0, 2.0], [1.0, float("inf"), 3.0]
        step = trainer.global_step
        log_line_plot(trainer, "density", xs, ys, "Density", "eig", "mass", step)
        figure = Figure()
        figure.add_subplot().plot([0, 1], [1, 0])
        log_image(trainer, "figure", figure, step)


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lightning_run")
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    callback = _MediaCallback()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _set_offline_env(monkeypatch, root)
        logger = pl.loggers.WandbLogger(offline=True, save_dir=root)
        trainer = pl.Trainer(
            max_steps=2,
            accelerator="cpu",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=logger,
            callbacks=[callback],
            default_root_dir=root,
        )
        trainer.fit(_TinyModel(), torch.utils.data.DataLoader(data, batch_size=4))
        assert wandb_loggers(trainer) == [logger]
        logger.experiment.finish()
    (path,) = find_run_files(root)
    return path, callback


def test_log_histograms_through_lightning(lightning_run):
    path, callback = lightning_run
    assert histogram_keys(read_history(path)) == ["param/weight"]
    histograms = read_histograms(path, "param/weight", step_key="trainer/global_step")
    assert [h.step for h in histograms] == [1, 2]
    assert all(h.values.sum() == 2 and len(h.bins) == 65 for h in histograms)
    assert callback.dropped == [1, 1]
    counts = [
        r["nonfinite_count/param/weight"]
        for r in read_history(path)
        if "param/weight/_type" in r
    ]
    assert counts == [1, 1]


def test_line_plot_and_image_through_lightning(lightning_run):
    path, _ = lightning_run
    rows = read_history(path)
    tables = [row for row in rows if row.get("density_table/_type") == "table-file"]
    images = [row for row in rows if row.get("figure/_type") == "image-file"]
    assert [row["density_table/nrows"] for row in tables] == [2, 2]
    assert [row["trainer/global_step"] for row in images] == [1, 2]
    assert all((path.parent / "files" / row["figure/path"]).is_file() for row in images)


def test_media_skipped_off_rank_zero(tmp_path, monkeypatch):
    _set_offline_env(monkeypatch, tmp_path)
    logger = pl.loggers.WandbLogger(offline=True, save_dir=tmp_path)
    trainer = types.SimpleNamespace(is_global_zero=False, loggers=[logger])
    tensor = torch.tensor([1.0, float("nan")])
    assert log_histograms(trainer, {"t": tensor}, step=0) == 0
    log_line_plot(trainer, "p", [0.0], [1.0], "T", "x", "y", step=0)
    log_image(trainer, "i", Figure(), step=0)
    assert logger._experiment is None
    assert not (tmp_path / "wandb").exists()


def test_media_argument_errors():
    trainer = types.SimpleNamespace(is_global_zero=True, loggers=[])
    with pytest.raises(ValueError, match="num_bins=0 is outside 1 to 512"):
        log_histograms(trainer, {}, step=0, num_bins=0)
    with pytest.raises(ValueError, match="xs has 2 values but ys has 1"):
        log_line_plot(trainer, "p", [0.0, 1.0], [1.0], "T", "x", "y", step=0)
    with pytest.raises(ValueError, match="x_label and y_label are both 'x'"):
        log_line_plot(trainer, "p", [0.0], [1.0], "T", "x", "x", step=0)
