"""Which of two minival scores takes `champion` (`promotion_decision`, a pure rule): the candidate when there is no
champion to compare with, or when it is strictly better on the same minival; a tie keeps the incumbent. The rule at
work on a real MLflow store and a real minival: tests/integration/test_champion.py."""

from __future__ import annotations

import pytest

from pipelines.registry.promotion import promotion_decision


@pytest.mark.parametrize(
    "candidate, champion, promoted",
    [
        (60.0, None, True),  # no champion: the first version takes it
        (0.0, None, True),
        (60.0, 50.0, True),  # better on the same minival
        (50.001, 50.0, True),
        (50.0, 50.0, False),  # a tie: the incumbent stays
        (40.0, 50.0, False),
    ],
)
def test_the_rule(candidate: float, champion: float | None, promoted: bool) -> None:
    promote, reason = promotion_decision(candidate, champion)
    assert promote is promoted
    assert reason.startswith("promoted" if promoted else "kept the champion") and "\n" not in reason
