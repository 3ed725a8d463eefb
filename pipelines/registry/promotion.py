"""Whether a newly registered version becomes `champion`: decided on minival, never on val.

The candidate and the current champion are both evaluated on the candidate's dataset version's minival, by the
same evaluation (each at its own eval resolution and crop); the candidate takes `champion` only when it scores
higher there. So a champion trained on an older dataset version is measured on the new version's minival, not
trusted on an old figure, and val stays what the model reports, untouched by the choice. A champion that cannot
be evaluated there (no weights file, other classes) is not comparable and gives way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.registry import tracking
from pipelines.registry.model_ref import load_registered_weights
from pipelines.registry.tracking import STATE_DICT_ARTIFACT, Tags

Evaluate = Callable[[torch.nn.Module, Any], float]  # (model in eval mode, its VariantSpec) -> minival top-1


@dataclass(frozen=True)
class Promotion:
    promote: bool
    candidate_top1: float  # on this minival
    champion_top1: float | None  # on the same minival; None: no comparable champion
    champion_version: str | None  # the champion when the candidate was registered
    reason: str  # one line

    def tags(self) -> dict[str, str]:
        """The decision as the registered version's tags."""
        return {
            Tags.PROMOTION_TOP1: f"{self.candidate_top1:.3f}",
            Tags.CHAMPION_TOP1: "none" if self.champion_top1 is None else f"{self.champion_top1:.3f}",
            Tags.CHAMPION_BEFORE: self.champion_version or "none",
            Tags.PROMOTION: self.reason,
        }


def promotion_decision(candidate_top1: float, champion_top1: float | None) -> tuple[bool, str]:
    """(promote, why): the candidate takes `champion` when there is none to compare with, or when it scores
    strictly higher on the same minival (a tie keeps the incumbent)."""
    if champion_top1 is None:
        return True, f"promoted: minival top-1 {candidate_top1:.2f}, no champion to compare with"
    if candidate_top1 > champion_top1:
        return True, f"promoted: minival top-1 {candidate_top1:.2f} > champion's {champion_top1:.2f}"
    return False, f"kept the champion: minival top-1 {candidate_top1:.2f} <= champion's {champion_top1:.2f}"


def decide_promotion(
    c: Any, registered_name: str, candidate_top1: float, num_classes: int, evaluate: Evaluate
) -> Promotion:
    """Compare the candidate's minival top-1 with the current champion's on the same minival (`evaluate` runs
    the champion there)."""
    champ = tracking.champion_version(c, registered_name)
    champion_top1, why_not = None, ""
    if champ is not None:
        loaded = load_registered_weights(c, champ)
        if loaded is None:
            why_not = f" (champion v{champ.version} has no {STATE_DICT_ARTIFACT} to evaluate)"
        elif loaded[0].num_classes != num_classes:
            why_not = f" (champion v{champ.version} has {loaded[0].num_classes} classes, this dataset {num_classes})"
        else:
            champion_top1 = evaluate(*loaded)
    promote, reason = promotion_decision(candidate_top1, champion_top1)
    return Promotion(
        promote, candidate_top1, champion_top1, None if champ is None else str(champ.version), reason + why_not
    )
