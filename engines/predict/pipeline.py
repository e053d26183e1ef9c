"""Prediction on pictures of any size: the batching path shared by the Python API (`predict`), the predict
command and its Triton client (`engines.triton.client`).

A picture (`icmoe.data.images.Picture`: an image, a frame of a multi-frame file, a slice of a volume) is
resized to the model's input as training resizes it, run in batches within the model's batch range
(a short batch is padded with copies, dropped afterwards), and its mask made at the picture's own size:
from the logits resized bilinearly, then thresholded or arg-maxed (the build's mask rule; SAM's own
post-processing), or, for a model without a rule or with `upsample="nearest"`, from the model-size mask
resized by nearest neighbour. `Contract` is what this needs to know of a model, from an engine or a
build's manifest; a runner (`LocalRunner`, or `engines.triton.client.TritonRunner`) runs the batches.

Work beside inference: the runner runs batches in its own threads while this thread queues the next
ones (a bounded number in flight), and preparing a batch (resizing the pictures) and making the masks
(resizing the logits) run in a small thread pool, so reading, resizing and writing overlap with the
model (docs/predict.md, "Throughput").
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from engines.base import Engine
from engines.errors import EngineError
from icmoe.core import cli
from icmoe.core.errors import IcmoeError
from icmoe.core.specs import BATCH
from icmoe.data.dicom_series import read_dicom_series
from icmoe.data.images import (
    Picture,
    apply_mask_rule,
    model_input,
    picture_from_array,
    picture_from_pil,
    read_images,
    resize_label,
    resize_logits,
)

DEFAULT_BATCH = 8
MASK_OUTPUT = "mask"
LOGITS_OUTPUT = "logits"  # (B, 1, S, S) of a binary model (mask = logits > 0), (B, C+1, S, S) of a label model
UPSAMPLING = ("logits", "nearest")  # how masks reach the picture's size (see the module docstring)
POOL_WORKERS = 2  # threads preparing batches and making masks beside inference


# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """The result for one picture (an image, or one frame or slice of a file).

    Attributes:
      mask: uint8 (H, W) at the picture's own size: 0/1 for a binary model, label values for a multi-class one.
      source: the file (or "<array i>", "<image i>" for an image given in memory).
      frame: frame or slice index in a multi-frame file, None for a single image.
      fractions: share of the picture's pixels per foreground class name (binary: {"foreground": f}).
      choice: the graph's per-image outputs (shape (batch,) only), by output name, e.g. a chosen candidate.
      seconds: this picture's share of its batch's inference time (the request's, with a server).
      probabilities: float32 (K, H, W) per foreground label at the picture's size, where asked for
        (`predict_jobs(probabilities=True)`), else None.
    """

    mask: np.ndarray
    source: str
    frame: Optional[int]
    fractions: Dict[str, float]
    choice: Dict[str, int]
    seconds: float
    probabilities: Optional[np.ndarray] = None

    @property
    def size(self) -> Tuple[int, int]:
        """(H, W)."""
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able figures (the mask left out)."""
        return {"path": self.source, "frame": self.frame, "size": list(self.size), "fractions": self.fractions,
                "choice": self.choice, "seconds": round(self.seconds, 6)}


@dataclass(frozen=True)
class Contract:
    """What prediction needs to know of a model, from its engine or its build's manifest.

    Attributes:
      image_size: side S of the square input.
      batch_range: (min, max) batch, max None for any.
      labels: (value, name) of each foreground label: binary [(1, "foreground")].
      choice: names of the per-image outputs (shape (batch,)).
      class_names: the engine's label names (None: binary).
      mask_rule: how `mask` follows from `logits` ("threshold", "argmax"), None where it does not.
      has_logits: the model has a `logits` output (probabilities can be made of it).
    """

    image_size: int
    batch_range: Tuple[int, Optional[int]]
    labels: Tuple[Tuple[int, str], ...]
    choice: Tuple[str, ...]
    class_names: Optional[Tuple[str, ...]]
    mask_rule: Optional[str] = None
    has_logits: bool = False

    @classmethod
    def of(cls, inputs: Sequence[Any], outputs: Sequence[Any], batch_range: Optional[Tuple[int, int]],
           class_names: Optional[Sequence[str]], mask_rule: Optional[str] = None) -> "Contract":
        """From an engine's or a manifest's tensor specs, batch range (None: any), label names and mask rule."""
        names = [o.name for o in outputs]
        if MASK_OUTPUT not in names:
            raise EngineError(f"this model has no {MASK_OUTPUT!r} output (has: {', '.join(names)}); nothing to predict")
        labels = [(1, "foreground")] if class_names is None else list(enumerate(class_names))[1:]
        lo, hi = batch_range if batch_range is not None else (1, None)
        return cls(int(inputs[0].shape[-1]), (int(lo), hi), tuple(labels),
                   tuple(o.name for o in outputs if tuple(o.shape) == (BATCH,)),
                   None if class_names is None else tuple(class_names),
                   mask_rule if LOGITS_OUTPUT in names else None, LOGITS_OUTPUT in names)

    def upsampling(self, wanted: str = "logits") -> str:
        """How masks reach the pictures' sizes: `wanted` ("logits" or "nearest"), "nearest" without a rule."""
        if wanted not in UPSAMPLING:
            raise cli.UsageError(f"--upsample must be one of {', '.join(UPSAMPLING)}, got {wanted!r}")
        return wanted if self.mask_rule is not None else "nearest"

    def outputs_needed(self, upsampling: str, probabilities: bool = False) -> Tuple[str, ...]:
        """The outputs prediction reads: the logits (or the mask; both for probabilities without upsampled
        logits) and the per-image outputs."""
        if upsampling == "logits":
            return (LOGITS_OUTPUT,) + self.choice
        return (MASK_OUTPUT,) + ((LOGITS_OUTPUT,) if probabilities and self.has_logits else ()) + self.choice

    @property
    def binary(self) -> bool:
        return self.class_names is None

    def batch_size(self, wanted: Optional[int]) -> int:
        """`wanted` checked against the batch range, or the default (DEFAULT_BATCH within the range)."""
        lo, hi = self.batch_range
        if wanted is None:
            return max(lo, min(DEFAULT_BATCH, hi or DEFAULT_BATCH))
        if wanted < 1 or wanted < lo or (hi is not None and wanted > hi):
            raise cli.UsageError(f"--batch-size {wanted} is outside this model's batch range {lo}..{hi or 'any'}")
        return int(wanted)


def engine_contract(engine: Engine) -> Contract:
    return Contract.of(engine.inputs, engine.outputs, engine.batch_range, engine.class_names, engine.mask_rule)


def probabilities_of(logits: np.ndarray, binary: bool) -> np.ndarray:
    """Per-foreground-label probabilities (K, H, W) of one image's logits (C, H, W): the sigmoid of a binary
    model's channel (> 0.5 exactly where its logit is > 0), the softmax over a label model's channels
    without the background's."""
    z = np.asarray(logits, dtype=np.float64)
    if binary:
        return (1.0 / (1.0 + np.exp(-z[:1]))).astype(np.float32)
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True))[1:].astype(np.float32)


def label_fractions(mask: np.ndarray, labels: Sequence[Tuple[int, str]]) -> Dict[str, float]:
    """Share of `mask`'s pixels holding each (value, name) label."""
    counts = np.bincount(mask.ravel(), minlength=max(v for v, _ in labels) + 1)
    return {name: float(counts[v]) / mask.size for v, name in labels}


# ----------------------------------------------------------------------------- runners


def ready(images: "np.ndarray | Future[np.ndarray]") -> np.ndarray:
    """A batch given as an array or as the future of one (being prepared in the pool)."""
    return images.result() if isinstance(images, Future) else images


class LocalRunner:
    """Runs batches on an engine in this process, in threads of its own: as many at once as the engine runs
    (`Engine.streams`: 1, or several with throughput settings).

    `submit(images float32 (B, 3, S, S) or its Future, whole)` -> a Future of ({output name: array}, seconds).
    """

    def __init__(self, engine: Engine, *, owned: bool = False) -> None:
        self.engine = engine
        self.owned = owned  # deactivate the engine on close (it was opened for this run)
        self.label = engine.name
        self.concurrency = max(1, engine.streams)
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="infer")

    def submit(self, images: "np.ndarray | Future[np.ndarray]",
               whole: bool) -> "Future[Tuple[Dict[str, np.ndarray], float]]":
        return self.pool.submit(self._infer, images)

    def _infer(self, images: "np.ndarray | Future[np.ndarray]") -> Tuple[Dict[str, np.ndarray], float]:
        x = ready(images)
        t0 = time.perf_counter()
        out = self.engine.infer(x)
        return out, time.perf_counter() - t0

    def check_batch(self, batch_size: int) -> None:
        """The engine checks every batch itself."""

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.owned:
            self.engine.deactivate()


# ----------------------------------------------------------------------------- the batching pipeline


@dataclass
class _Job:
    key: Any
    pictures: List[Picture]
    results: List[Optional["Future[Prediction]"]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.pictures)

    @property
    def done(self) -> bool:
        return all(r is not None and r.done() for r in self.results)


class _Pipeline:
    """Pictures of many jobs (files) in batches, up to the runner's concurrency (plus one queued) in flight,
    batches prepared and masks made in `pool`, jobs back in order."""

    def __init__(self, runner: Any, contract: Contract, batch_size: int, pool: ThreadPoolExecutor,
                 upsampling: str = "logits", probabilities: bool = False) -> None:
        self.runner, self.contract, self.batch_size, self.pool = runner, contract, batch_size, pool
        self.upsampling = contract.upsampling(upsampling)
        self.probabilities = probabilities
        self.jobs: Deque[_Job] = deque()
        self.pending: List[Tuple[_Job, int]] = []
        self.in_flight: Deque[Tuple[Future, List[Tuple[_Job, int]]]] = deque()

    def add(self, key: Any, pictures: List[Picture]) -> Iterator[Tuple[Any, List[Prediction]]]:
        """Queue a job's pictures; yields the jobs finished meanwhile."""
        job = _Job(key, pictures)
        self.jobs.append(job)
        for k in range(len(pictures)):
            self.pending.append((job, k))
            if len(self.pending) == self.batch_size:
                self._submit()
        yield from self._finished()

    def flush(self) -> Iterator[Tuple[Any, List[Prediction]]]:
        """Run what is queued; yields the remaining jobs."""
        if self.pending:
            self._submit()
        while self.in_flight:
            self._collect(*self.in_flight.popleft())
        while self.jobs:
            self._wait_first()
            yield from self._finished()

    def _prepare(self, pics: List[Picture]) -> np.ndarray:
        """The batch: pictures resized to the model's input, (B, 3, S, S), padded to the smallest batch."""
        x = np.stack([model_input(p, self.contract.image_size) for p in pics])
        short = self.contract.batch_range[0] - len(pics)
        if short > 0:  # below the build's smallest batch: pad with copies, dropped afterwards
            x = np.concatenate([x, np.repeat(x[-1:], short, axis=0)])
        return x

    def _submit(self) -> None:
        items, self.pending = self.pending, []
        pics = [job.pictures[k] for job, k in items]
        whole = all(p.pixels.dtype == np.uint8 for p in pics)  # whole numbers: a uint8 request carries them exactly
        self.in_flight.append((self.runner.submit(self.pool.submit(self._prepare, pics), whole), items))
        # One batch queued beyond those running, so the engine never waits for this thread.
        while len(self.in_flight) > max(1, self.runner.concurrency) + 1:
            self._collect(*self.in_flight.popleft())

    def _collect(self, future: Future, items: List[Tuple[_Job, int]]) -> None:
        out, seconds = future.result()
        for i, (job, k) in enumerate(items):
            job.results[k] = self.pool.submit(self._finish, out, i, job.pictures[k], seconds / len(items))

    def _finish(self, out: Dict[str, np.ndarray], i: int, pic: Picture, seconds: float) -> Prediction:
        """One picture's Prediction from the batch's outputs: its mask at the picture's own size."""
        s, binary, probabilities = self.contract.image_size, self.contract.binary, None
        if self.upsampling == "logits":
            logits = resize_logits(np.asarray(out[LOGITS_OUTPUT][i]), pic.size)
            mask = apply_mask_rule(logits, self.contract.mask_rule or "")
            if self.probabilities:  # of the same resized logits: > 0.5 exactly where a binary mask is 1
                probabilities = probabilities_of(logits, binary)
        else:
            mask = resize_label(np.asarray(out[MASK_OUTPUT][i]).reshape(s, s), pic.size).astype(np.uint8)
            if self.probabilities:  # resized as the mask is (nearest)
                p = probabilities_of(np.asarray(out[LOGITS_OUTPUT][i]), binary)
                probabilities = np.stack([resize_label(c, pic.size) for c in p])
        return Prediction(mask=mask, source=pic.source, frame=pic.frame, seconds=seconds,
                          fractions=label_fractions(mask, self.contract.labels),
                          choice={n: int(np.asarray(out[n]).reshape(-1)[i]) for n in self.contract.choice},
                          probabilities=probabilities)

    def _wait_first(self) -> None:
        for r in self.jobs[0].results:
            if r is not None:
                r.result()

    def _finished(self) -> Iterator[Tuple[Any, List[Prediction]]]:
        while self.jobs and self.jobs[0].done:
            job = self.jobs.popleft()
            yield job.key, [r.result() for r in job.results]  # type: ignore[union-attr]


def predict_jobs(jobs: Iterable[Tuple[Any, List[Picture]]], runner: Any, contract: Contract, *,
                 batch_size: int, upsampling: str = "logits", probabilities: bool = False,
                 pool: Optional[ThreadPoolExecutor] = None) -> Iterator[Tuple[Any, List[Prediction]]]:
    """Predict the pictures of many jobs (e.g. files) in batches; the shared path of the API and the command.

    Arguments:
      jobs: (key, pictures) pairs, read lazily; an error raised while reading one (`DataError`,
        `MissingExtra`) ends the run after the jobs before it are finished and yielded.
      runner: `LocalRunner` or `TritonRunner`.
      contract: the model's input size, batch range, labels, mask rule and per-image outputs.
      batch_size: pictures per batch (checked against the contract by the caller).
      upsampling: "logits" (bilinear logits, then the mask rule) or "nearest" (the model-size mask).
      probabilities: also keep each picture's probabilities (the runner must return the logits).
      pool: threads that prepare batches and make masks (default: a pool of `POOL_WORKERS` for this run).

    Returns:
      iterator of (key, [Prediction per picture]) in the jobs' order.
    """
    own = pool is None
    pool = pool or ThreadPoolExecutor(POOL_WORKERS, thread_name_prefix="predict")
    try:
        pipe = _Pipeline(runner, contract, batch_size, pool, upsampling, probabilities)
        it = iter(jobs)
        while True:
            try:
                key, pictures = next(it)
            except StopIteration:
                break
            except IcmoeError:  # a bad file, or a missing extra (DICOM without pydicom)
                yield from pipe.flush()  # what was read before it is finished and written first
                raise
            yield from pipe.add(key, pictures)
        yield from pipe.flush()
    finally:
        if own:
            pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- the Python API


def pictures_of(image: Any, index: int = 0, *, window: Optional[Tuple[float, float]] = None) -> List[Picture]:
    """The pictures of one input: a path (every frame or slice of the file; a folder: the slices of every
    DICOM series in it, each in volume order), a PIL image, or a uint8/uint16 array (H, W), (H, W, 3) or
    (H, W, 4) (see `icmoe.data.images`)."""
    if isinstance(image, (str, Path)) and Path(image).is_dir():
        return [p for series in read_dicom_series([image], window=window) for p in series.pictures]
    if isinstance(image, (str, Path)):
        return read_images(image, window=window).pictures
    if isinstance(image, Image.Image):
        return [picture_from_pil(image, f"<image {index}>")]
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    return [picture_from_array(image, f"<array {index}>")]


def predict(engine: Engine, images: Any, *, batch_size: Optional[int] = None,
            window: Optional[Tuple[float, float]] = None, upsample: str = "logits") -> List[Prediction]:
    """Masks of images of any size at their own sizes.

    Arguments:
      engine: any engine (activated here if it is not).
      images: one image or a list: paths (PNG, JPEG, BMP, TIFF, DICOM, NIfTI; a folder of DICOM series),
        PIL images, or uint8/uint16 arrays (H, W), (H, W, 3), (H, W, 4).
      batch_size: pictures per batch (default: 8 within the engine's batch range).
      window: (low, high) intensity window for NIfTI volumes and DICOM series; default each slice's
        min..max (a DICOM slice's own window where it has one).
      upsample: "logits" (default: the logits resized bilinearly, then thresholded or arg-maxed, where the
        model has a mask rule) or "nearest" (the model-size mask resized by nearest neighbour).

    Returns:
      list of Prediction, one per picture: one per image, and one per frame or slice of a multi-frame
      file or volume (`.source`, `.frame` say which); a folder's DICOM series slice by slice in volume
      order (`engines.predict.series.predict_series` keeps them grouped by series).

    Raises:
      DataError: an unreadable file or unsupported array (one line naming it); InputError/EngineError from the engine.
    """
    single = isinstance(images, (str, Path, Image.Image, np.ndarray)) or hasattr(images, "detach")
    items = [images] if single else list(images)
    contract = engine_contract(engine)
    jobs = ((i, pictures_of(x, i, window=window)) for i, x in enumerate(items))
    out: List[Prediction] = []
    runner = LocalRunner(engine.activate())
    try:
        for _, preds in predict_jobs(jobs, runner, contract, batch_size=contract.batch_size(batch_size),
                                     upsampling=upsample):
            out.extend(preds)
    finally:
        runner.close()
    return out
