"""The prediction pipeline with small engines made here (real `Engine` subclasses, no model):

- masks at the picture's size from the logits resized bilinearly, then thresholded: a circle's signed
  distance at 32x32 brought to 320x320 has a smooth edge on the true circle (its boundary pixels number
  fewer than the true perimeter, each within a pixel and a half of the true radius), where the model-size
  mask resized by nearest neighbour draws a staircase (more boundary pixels than the perimeter, up to
  several pixels off); Dice against the true disc is not lower;
- work beside inference: batches run in the runner's threads, several at once with streams, answers in
  the inputs' order; files are read ahead at most `depth` at a time.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engines.base import Engine
from engines.predict.files import read_ahead
from engines.predict.pipeline import LocalRunner, predict
from icmoe.core.specs import BATCH, TensorSpec

M, FULL = 32, 320  # the model's side and the picture's: ten times larger
RADIUS = 9.3  # in model pixels (not a whole number: the circle crosses pixels at every angle)


class CircleEngine(Engine):
    """logits = the signed distance to a circle (model pixels, positive inside), mask = logits > 0, and a
    per-image output: the picture's mean value rounded (which picture a result belongs to)."""

    def __init__(self, streams: int = 1, delay: float = 0.0) -> None:
        super().__init__(inputs=[TensorSpec("image", "float32", (BATCH, 3, M, M))],
                         outputs=[TensorSpec("logits", "float32", (BATCH, 1, M, M)),
                                  TensorSpec("mask", "uint8", (BATCH, 1, M, M)), TensorSpec("mean", "int32", (BATCH,))],
                         batch_range=(1, 8), mask_rule="threshold")
        self.n_streams, self.delay, self.threads_seen = streams, delay, set()
        self.name = "circle"
        c = np.arange(M) + 0.5 - M / 2
        self.distance = (RADIUS - np.hypot(c[:, None], c[None, :])).astype(np.float32)

    @property
    def streams(self) -> int:
        return self.n_streams

    def _activate(self) -> None:
        pass

    def _infer(self, images: np.ndarray):
        self.threads_seen.add(threading.current_thread().name)
        time.sleep(self.delay * random.random())  # batches finish out of order
        b = len(images)
        logits = np.repeat(self.distance[None, None], b, axis=0)
        return {"logits": logits, "mask": (logits > 0).astype(np.uint8),
                "mean": np.rint(images.mean(axis=(1, 2, 3))).astype(np.int32)}


def _true_disc() -> np.ndarray:
    c = np.arange(FULL) + 0.5 - FULL / 2
    return np.hypot(c[:, None], c[None, :]) < RADIUS * FULL / M


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def masks():
    picture = np.full((FULL, FULL), 100, dtype=np.uint8)
    with CircleEngine() as engine:
        return {way: predict(engine, picture, upsample=way)[0].mask.astype(bool) for way in ("logits", "nearest")}


def test_logits_give_a_smooth_edge_on_the_true_circle(masks):
    perimeter = 2 * np.pi * RADIUS * FULL / M
    c = np.arange(FULL) + 0.5 - FULL / 2
    radius = np.hypot(c[:, None], c[None, :])
    figures = {}
    for way, mask in masks.items():
        edge = _boundary(mask)
        figures[way] = (edge.sum() / perimeter, np.abs(radius[edge] - RADIUS * FULL / M).max())
    smooth, stairs = figures["logits"], figures["nearest"]
    # A digital circle's 8-connected contour has about 2*sqrt(2)/pi = 0.90 pixels per unit of perimeter; a
    # staircase of 10-pixel steps follows the axes: about 4/pi = 1.27.
    assert smooth[0] == pytest.approx(0.90, abs=0.05) and stairs[0] > 1.15, figures
    assert smooth[1] <= 1.5 and stairs[1] >= 4.0, figures  # pixels off the true radius


def test_dice_at_full_size_is_not_lower_from_the_logits(masks):
    truth = _true_disc()
    assert _dice(masks["logits"], truth) >= _dice(masks["nearest"], truth) > 0.9
    assert _dice(masks["logits"], truth) > 0.995


def test_batches_run_beside_the_caller_in_the_inputs_order():
    pictures = [np.full((40, 50), v, dtype=np.uint8) for v in range(0, 250, 7)]  # means 0, 7, 14, ...
    engine = CircleEngine(streams=3, delay=0.02)
    got = predict(engine, pictures, batch_size=2)
    assert [p.choice["mean"] for p in got] == list(range(0, 250, 7))
    assert all(p.mask.shape == (40, 50) for p in got)
    assert threading.current_thread().name not in engine.threads_seen and len(engine.threads_seen) > 1
    runner = LocalRunner(engine)
    assert runner.concurrency == 3
    runner.close()


def test_files_are_read_ahead_at_most_depth_at_a_time():
    started, consumed, most = [0], [0], [0]
    lock = threading.Lock()

    def read(item):
        with lock:
            started[0] += 1
            most[0] = max(most[0], started[0] - consumed[0])
        return item.upper()

    items = [f"f{i}" for i in range(20)]
    with ThreadPoolExecutor(4) as pool:
        out = []
        for item, future in read_ahead(items, read, pool, depth=3):
            out.append((item, future.result()))
            time.sleep(0.002)
            with lock:
                consumed[0] += 1
    assert out == [(i, i.upper()) for i in items] and 1 <= most[0] <= 3
