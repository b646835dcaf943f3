"""A training run's metric outputs: event files read back by TensorBoard's own reader, metrics.csv
(rows, resume truncation, surviving a SIGKILL) and the loss plot."""

import math
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from slmkit.errors import SlmError
from slmkit.train.metrics import COLUMNS, MetricsLogger, read_metrics
from slmkit.train.plot import ema, plot_losses
from slmkit.train.tensorboard import EventWriter, crc32c, masked_crc32c

event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
from tensorboard.backend.event_processing import event_accumulator, event_file_loader  # noqa: E402
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_records  # noqa: E402


def read_events(path):
    """Every Event in one file, through TensorBoard's record reader (which checks both CRCs of each record)."""
    return [event_pb2.Event.FromString(raw) for raw in event_file_loader.RawEventFileLoader(str(path)).Load()]


def accumulate(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(x):
    return float(np.float32(x))


# --- crc32c and the event file -------------------------------------------------------------------


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    # RFC 3720 (iSCSI) appendix B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_masked_crc32c_equals_tensorboards():
    rng = random.Random(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert masked_crc32c(data) == tb_records.masked_crc32c(data)


def test_event_writer_read_by_tensorboard(tmp_path):
    points = [("train/loss", 10.8125, 0, 1000.25), ("train/loss", 0.1, 1, 1001.5), ("train/lr", 3e-4, 1, 1001.5),
              ("train/loss", -2.5, 2**40, 1002.0), ("val/loss", 1e40, 7, 1003.0), ("val/loss", float("nan"), 8, 1004.0)]
    with EventWriter(tmp_path / "tb") as writer:
        for tag, value, step, wall_time in points:
            writer.add_scalar(tag, value, step, wall_time=wall_time)

    (path,) = (tmp_path / "tb").iterdir()
    stamp, host = path.name.removeprefix("events.out.tfevents.").split(".", 1)
    assert path.name.startswith("events.out.tfevents.") and stamp.isdigit() and host == socket.gethostname()

    first, *events = read_events(path)
    assert first.file_version == "brain.Event:2"
    assert len(events) == len(points)
    for event, (tag, value, step, wall_time) in zip(events, points):
        assert event.wall_time == wall_time and event.step == step
        (v,) = event.summary.value
        assert v.tag == tag
        if math.isnan(value):
            assert math.isnan(v.simple_value)
        else:
            assert v.simple_value == (math.inf if value == 1e40 else f32(value))  # beyond float32: inf

    acc = accumulate(tmp_path / "tb")
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr", "val/loss"]
    assert scalars(acc, "train/loss") == [(0, f32(10.8125)), (1, f32(0.1)), (2**40, -2.5)]
    assert scalars(acc, "train/lr") == [(1, f32(3e-4))]


def test_event_writer_defaults_and_errors(tmp_path):
    writer = EventWriter(tmp_path)
    other = EventWriter(tmp_path)  # same second, same folder: a file of its own
    assert writer.path != other.path
    writer.add_scalar("a", np.float32(1.5), np.int64(3))
    with pytest.raises(SlmError, match="integer"):
        writer.add_scalar("a", 1.0, 2.5)
    with pytest.raises(SlmError, match="not a number"):
        writer.add_scalar("a", "high", 1)
    with pytest.raises(SlmError, match="tag"):
        writer.add_scalar("", 1.0, 1)
    writer.close()
    with pytest.raises(SlmError, match="closed"):
        writer.add_scalar("a", 1.0, 4)
    other.close()
    _, event = read_events(writer.path)
    assert event.step == 3 and event.summary.value[0].simple_value == 1.5
    assert abs(event.wall_time - time.time()) < 60


# --- metrics.csv ---------------------------------------------------------------------------------


def log_run(out_dir, steps, resume_step=None, loss_offset=0.0):
    with MetricsLogger(out_dir, resume_step=resume_step) as logger:
        for step in steps:
            values = dict(tokens=step * 4096, loss=5.0 / step + loss_offset, lr=1e-3 * step / 50,
                          grad_norm=0.5 + step / 100, tokens_per_s=12345.5)
            if step % 20 == 0:
                values["val_loss"] = 6.0 / step + loss_offset
            logger.log(step, **values)


def test_metrics_rows_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        written = logger.log(10, tokens=40960, loss=2.75, lr=3e-4, grad_norm=1.25, tokens_per_s=1000.0, elapsed_s=3.5)
        logger.log(20, tokens=np.int64(81920), loss=np.float32(2.5), val_loss=2.625)
    assert written == dict(step=10, tokens=40960, loss=2.75, lr=3e-4, grad_norm=1.25, tokens_per_s=1000.0,
                           val_loss=None, elapsed_s=3.5)

    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert lines[1] == "10,40960,2.75,0.0003,1.25,1000.0,,3.5"
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[0] == written
    assert rows[1]["step"] == 20 and rows[1]["tokens"] == 81920 and rows[1]["loss"] == 2.5
    assert rows[1]["lr"] is None and rows[1]["grad_norm"] is None and rows[1]["val_loss"] == 2.625
    assert 0 <= rows[1]["elapsed_s"] < 60  # filled in from the logger's clock

    acc = accumulate(tmp_path / "tensorboard")
    assert sorted(acc.Tags()["scalars"]) == ["train/grad_norm", "train/loss", "train/lr", "train/tokens_per_s",
                                              "val/loss"]
    assert scalars(acc, "train/loss") == [(10, 2.75), (20, 2.5)]
    assert scalars(acc, "train/lr") == [(10, f32(3e-4))]
    assert scalars(acc, "val/loss") == [(20, 2.625)]


def test_resume_keeps_steps_up_to_checkpoint_and_appends(tmp_path):
    log_run(tmp_path, range(10, 101, 10))  # the first run got to step 100, its checkpoint is at 60
    before = read_metrics(tmp_path / "metrics.csv")
    log_run(tmp_path, range(70, 131, 10), resume_step=60, loss_offset=1.0)

    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(10, 131, 10))
    assert rows[:6] == before[:6]
    assert [r["loss"] for r in rows[6:]] == [5.0 / s + 1.0 for s in range(70, 131, 10)]
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [20, 40, 60, 80, 100, 120]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # TensorBoard reads both event files and, at the resumed run's START, drops the old steps 70..100.
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    acc = accumulate(tmp_path / "tensorboard")
    expected = [(s, f32(5.0 / s)) for s in range(10, 61, 10)] + [(s, f32(5.0 / s + 1.0)) for s in range(70, 131, 10)]
    assert scalars(acc, "train/loss") == expected
    assert [s for s, _ in scalars(acc, "val/loss")] == [20, 40, 60, 80, 100, 120]


def test_resume_edge_cases(tmp_path):
    # No metrics.csv yet: a new one.
    log_run(tmp_path / "a", [5, 6], resume_step=4)
    assert [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.csv")] == [5, 6]

    # A row half-written when the run was killed is dropped; elapsed_s continues from the last kept row.
    csv_path = tmp_path / "b" / "metrics.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(",".join(COLUMNS) + "\n1,10,3.0,,,,,100.0\n2,20,2.9,,,,,200.0\n3,30,2.")
    assert [r["step"] for r in read_metrics(csv_path)] == [1, 2]
    with MetricsLogger(tmp_path / "b", resume_step=10) as logger:
        with pytest.raises(SlmError, match="steps must increase"):
            logger.log(2, loss=1.0)
        logger.log(3, loss=2.8)
    rows = read_metrics(csv_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.9), (3, 2.8)]
    assert 200.0 <= rows[2]["elapsed_s"] < 260.0

    # A fresh run (no resume_step) in the same folder starts the file again.
    log_run(tmp_path / "b", [1])
    assert [r["step"] for r in read_metrics(csv_path)] == [1]


def test_rows_survive_sigkill(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from slmkit.train.metrics import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r})
        for step in range(1, 4):
            logger.log(step, tokens=step * 100, loss=4.0 - step, val_loss=5.0 - step)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.csv")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    acc = accumulate(tmp_path / "tensorboard")
    assert scalars(acc, "train/loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert scalars(acc, "val/loss") == [(1, 4.0), (2, 3.0), (3, 2.0)]


def test_metrics_bad_input(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(SlmError, match="unknown metric.*perplexity"):
            logger.log(1, loss=2.0, perplexity=7.4)
        with pytest.raises(SlmError, match="loss must be a number"):
            logger.log(1, loss="low")
        with pytest.raises(SlmError, match="tokens must be an integer"):
            logger.log(1, tokens=1.5)
        with pytest.raises(SlmError, match="step must be >= 0"):
            logger.log(-1, loss=1.0)
    with pytest.raises(SlmError, match="no metrics file"):
        read_metrics(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("epoch,acc\n1,0.5\n")
    with pytest.raises(SlmError, match="not a metrics file"):
        read_metrics(tmp_path / "other.csv")
    (tmp_path / "bad.csv").write_text(",".join(COLUMNS) + "\n1,10,abc,,,,,\n")
    with pytest.raises(SlmError, match="line 2: loss 'abc'"):
        read_metrics(tmp_path / "bad.csv")


# --- the plot ------------------------------------------------------------------------------------


def test_ema_is_the_debiased_average():
    weight, values = 0.8, [4.0, 2.0, 3.0, 1.0]
    for i, got in enumerate(ema(values, weight)):
        terms = [weight ** (i - j) * (1 - weight) * values[j] for j in range(i + 1)]
        assert got == pytest.approx(sum(terms) / (1 - weight ** (i + 1)))
    assert ema([2.5] * 5, 0.99) == pytest.approx([2.5] * 5)
    assert ema(values, 0.0) == values
    with pytest.raises(SlmError, match="smoothing"):
        ema(values, 1.0)


@pytest.mark.parametrize("log_y", [False, True])
def test_plot_losses_writes_png(tmp_path, log_y):
    import matplotlib.image

    rng = random.Random(0)
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 301):
            logger.log(step, tokens=step * 100_000, loss=3.0 + 8.0 / math.sqrt(step) + rng.uniform(-0.3, 0.3),
                       val_loss=3.2 + 8.0 / math.sqrt(step) if step % 50 == 0 else None)
    png = plot_losses(tmp_path / "metrics.csv", tmp_path / "plots" / "loss.png", title="tiny run", log_y=log_y)

    assert png == tmp_path / "plots" / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (height, width) and width >= 600 and height >= 400
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 50  # lines, text, not blank
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["loss.png"]


def test_plot_losses_without_losses(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, tokens=10, lr=1e-3)
    with pytest.raises(SlmError, match="no loss values"):
        plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert not os.path.exists(tmp_path / "loss.png")
