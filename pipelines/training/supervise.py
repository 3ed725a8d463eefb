"""How the job's driver watches and stops its Ray Train run: a TorchTrainer it can abort (`abortable_trainer`,
`abort`), SIGTERM turned into that abort while `fit` blocks (`StopOnSigterm`), and one progress line per finished
epoch read from the job's MLflow run (`EpochProgress`).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from pipelines.training.loop import last_logged_epoch

log = logging.getLogger(__name__)


def abortable_trainer(*args: Any, **kwargs: Any) -> Any:
    """A TorchTrainer whose run can be aborted from the driver (a cancelled flow run), so Ray Train stops its
    workers and withdraws its resource request instead of leaving them to the owner's death (`abort`)."""
    from ray.train.torch import TorchTrainer

    class AbortableTorchTrainer(TorchTrainer):
        controller: Any = None

        # NOTE: Ray 2.60's only hook that sees the controller actor (DataParallelTrainer registers its own
        # SIGINT handler with it); pinned in constraints.txt.
        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller
            # mypy sees Ray's V1 TorchTrainer (V2 is picked at import time), which has neither hook: the ignores.
            super()._register_sigint_handler(controller)  # type: ignore[misc]

        # NOTE: Ray 2.60 starts a DatasetManager actor for every run, also one without Ray Datasets (ours have
        # their own loaders): one more process, importing Ray Data, on the way to the first step.
        def _create_default_callbacks(self) -> list[Any]:
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

            callbacks = super()._create_default_callbacks()  # type: ignore[misc]  # V2's hook (see above)
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return AbortableTorchTrainer(*args, **kwargs)


def abort(trainer: Any) -> None:
    import ray

    if getattr(trainer, "controller", None) is None:
        return
    try:
        ray.get(trainer.controller.abort.remote(), timeout=25)
    except Exception:  # noqa: BLE001 (already gone: nothing left to stop)
        pass


class StopOnSigterm:
    """SIGTERM (a cancelled Prefect flow run, `kill`) while Ray Train runs the job.

    The driver waits in `ray.get`, which runs a signal handler at once but raises the handler's exception only
    when the job has ended (as a SystemError): the cancellation would wait for the whole training. So the
    handler here keeps the exception that the handler before it (Prefect's TerminationSignal, or exit) raises,
    and stops the job from a thread (`on_stop`); once `fit` returns, `reraise` raises that exception.
    """

    def __init__(self, on_stop: Callable[[], Any]):
        self.on_stop = on_stop
        self.exc: BaseException | None = None
        # What signal.signal returned: a handler, SIG_DFL or SIG_IGN (ints), or None (not set from Python).
        self.previous: Callable[[int, FrameType | None], Any] | int | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.exc is not None:
            return  # already stopping
        try:
            if callable(self.previous):
                self.previous(signum, frame)
            self.exc = SystemExit(128 + signum)  # the default action, after the job is stopped
        except BaseException as exc:  # noqa: BLE001 (kept, raised by `reraise`)
            self.exc = exc
        self.thread = threading.Thread(target=self.on_stop, name="stop-job", daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 30) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def reraise(self) -> None:
        if self.exc is not None:
            self.wait()
            raise self.exc


class EpochProgress:
    """One line per finished epoch, read from the job's MLflow run while Ray trains (rank 0 logs each epoch
    there as soon as its checkpoint is persisted), so the driver's log (the Prefect run's) follows the job."""

    # An epoch's metrics land in one batch: once its `epoch_seconds` is seen, the rest of its row is there too,
    # so that key is read first and decides which epochs are complete.
    DONE_KEY = "epoch_seconds"
    KEYS = ("train_loss", "minival_top1", "best_minival_top1", "images_per_s", "image_size")

    def __init__(
        self, c: Any, run_id: str, label: str, epochs: int, emit: Callable[[str], None], interval: float = 2.0
    ):
        self.c, self.run_id, self.label, self.epochs = c, run_id, label, epochs
        self.emit, self.interval = emit, interval
        self.shown = last_logged_epoch(c, run_id)  # a resumed job shows only its new epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{label}", daemon=True)

    def __enter__(self) -> EpochProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last epoch's line, if it landed after the final poll

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 (a missed poll is shown by the next one)
                log.debug("progress poll failed: %s", exc)

    def poll(self) -> None:
        rows = {
            m.step: {self.DONE_KEY: m.value}
            for m in self.c.get_metric_history(self.run_id, self.DONE_KEY)
            if m.step > self.shown
        }
        if not rows:
            return
        for key in self.KEYS:
            for m in self.c.get_metric_history(self.run_id, key):
                if m.step in rows:
                    rows[m.step][key] = m.value
        for epoch in sorted(rows):
            self.emit(format_epoch_line(self.label, epoch, self.epochs, rows[epoch]))
            self.shown = epoch


def format_epoch_line(label: str, epoch: int, epochs: int, row: Mapping[str, float]) -> str:
    parts = [f"{label} epoch {epoch + 1}/{epochs}"]
    if "train_loss" in row:
        parts.append(f"train loss {row['train_loss']:.3f}")
    if not math.isnan(row.get("minival_top1", math.nan)):
        parts.append(f"minival top-1 {row['minival_top1']:.1f}")
    if "best_minival_top1" in row:
        parts.append(f"best {row['best_minival_top1']:.1f}")
    if "image_size" in row:
        parts.append(f"{row['image_size']:.0f} px")
    if "images_per_s" in row:
        parts.append(f"{row['images_per_s']:.0f} img/s")
    if "epoch_seconds" in row:
        parts.append(f"{row['epoch_seconds']:.1f} s")
    return ", ".join(parts)
