"""A flow run that fails for a reason the flow has already put in one line: a Failed state, no traceback.

A flow that returns a Failed state still has its exception raised by Prefect's engine when the run's process
exits, which a work pool's process logs to the run as "Engine execution exited with unexpected exception" with
the whole traceback under the one line that said why. That record, and only that one, is dropped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from prefect import get_run_logger
from prefect.states import Failed, State

from pipelines.dataset import BAD_INPUT

P = ParamSpec("P")
R = TypeVar("R")

# The logger Prefect's engine reports a flow run's exceptions on (`prefect.logging.loggers.flow_run_logger`).
FLOW_RUN_LOGGER = "prefect.flow_runs"


class _AlreadyReported(logging.Filter):
    """Drops the log record that carries `exc` as its exception (the flow has logged it in its own words), then
    leaves the logger: a long-lived process running many flows does not gather filters."""

    def __init__(self, logger: logging.Logger, exc: BaseException):
        super().__init__()
        self.logger, self.exc = logger, exc

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.exc:
            self.logger.removeFilter(self)
            return False
        return True


def failed_run(logger: Any, exc: BaseException, message: str | None = None) -> State:
    """Log `message` (default: the exception's text) as the run's one error line and return the Failed state
    for the flow to return; a direct caller of the flow gets `exc` raised, as Prefect does."""
    message = message or str(exc)
    logger.error("%s", message)
    engine_logger = logging.getLogger(FLOW_RUN_LOGGER)
    engine_logger.addFilter(_AlreadyReported(engine_logger, exc))
    return Failed(message=message, data=exc)


class RunFailed(RuntimeError):
    """The flow's work ended and the run fails for the reason in the message (some members or trials failed);
    raised from the flow body after it recorded what it could, reported like bad input."""


def one_line_failures(fn: Callable[P, R]) -> Callable[P, R]:
    """The flow body's bad input (`BAD_INPUT`) and `RunFailed` end the run Failed with the exception's one line
    (`failed_run`). Goes under `@flow`, which turns the Failed state the body returns into the exception raised
    to a direct caller: so, to its callers, the flow still returns `R` or raises."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BAD_INPUT + (RunFailed,) as exc:
            # A State, which the flow engine takes for the run's final state (never seen by a caller as a value).
            return cast(R, failed_run(get_run_logger(), exc))

    return run
