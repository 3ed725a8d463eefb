"""The scaling search's and study's pure parts: the grid under the FLOPs constraint, the baseline scaled at
phi = 1, the methods at equal FLOPs, the winner; V2's non-uniform depth; the study's verdict and plot."""

from __future__ import annotations

import math

import pytest

import models
from pipelines.search.experiment import study_verdict
from models import PAPER_COEFFICIENTS, CoefficientSet, plan_blocks, resolve_variant, round_resolution, stage_repeats
from pipelines.registry import compare
from pipelines.search import trials
from pipelines.training.recipe import ModelConfig

BASE = resolve_variant("efficientnet_b0", phi=-9)  # the demo's baseline


def test_every_grid_point_meets_the_constraint_and_the_others_are_left_out() -> None:
    alphas, betas, gammas, tolerance = [1.0, 1.2, 1.4], [1.0, 1.1], [1.1, 1.15, 1.3], 0.05
    points = trials.search_points(alphas, betas, gammas, tolerance)
    off = [(a, b, g) for a in alphas for b in betas for g in gammas
           if abs(a * b * b * g * g - 2) > tolerance * 2]
    assert len(points) + len(off) == len(alphas) * len(betas) * len(gammas)
    assert points and off
    for cs in points:
        assert abs(cs.alpha * cs.beta**2 * cs.gamma**2 - 2) <= tolerance * 2
        assert cs.name == f"alpha={cs.alpha:g} beta={cs.beta:g} gamma={cs.gamma:g}"
    assert (1.2, 1.1, 1.15) in [(p.alpha, p.beta, p.gamma) for p in points]  # the paper's: 1.92


@pytest.mark.parametrize("grid, message", [
    (([0.9, 1.2], [1.1], [1.15]), "alphas: every value must be a number >= 1"),
    (([1.2], [], [1.15]), "betas is empty"),
    (([1.0], [1.0], [1.0]), "no point of the grid"),
])
def test_a_bad_grid_is_one_clear_error(grid, message) -> None:
    with pytest.raises(ValueError, match=message):
        trials.search_points(*grid, tolerance=0.1)


def test_a_trial_is_the_baseline_scaled_at_phi_1() -> None:
    cs = CoefficientSet("p", 1.3, 1.1, 1.15)
    (plan,) = trials.search_trials(BASE, [cs])
    spec = trials.member_spec(plan.model)
    assert spec.depth_mult == pytest.approx(BASE.depth_mult * 1.3, abs=1e-6)
    assert spec.width_mult == pytest.approx(BASE.width_mult * 1.1, abs=1e-6)
    assert spec.train_resolution == spec.eval_resolution == round_resolution(BASE.train_resolution * 1.15)
    assert plan.params == {"alpha": 1.3, "beta": 1.1, "gamma": 1.15, "flops_factor": cs.flops_factor}
    # A V2 baseline keeps V2's eval-to-train ratio and its non-uniform depth.
    v2 = resolve_variant("efficientnet_v2_s", late_depth_stages=2)
    (plan,) = trials.search_trials(v2, [cs])
    spec = trials.member_spec({**plan.model, "late_depth_stages": 2})
    assert spec.train_resolution == round_resolution(300 * 1.15)
    assert spec.eval_resolution == round(spec.train_resolution * 384 / 300)


@pytest.mark.parametrize("method, s, expected", [
    ("width", 1.5, (1.0, 1.5, 1.0)),
    ("depth", 2.0, (2.0, 1.0, 1.0)),
    ("resolution", 1.25, (1.0, 1.0, 1.25)),
    ("compound", 2.0, (1.2**2, 1.1**2, 1.15**2)),
])
def test_method_factors(method, s, expected) -> None:
    assert trials.method_factors(method, s, PAPER_COEFFICIENTS) == pytest.approx(expected)


def test_fit_to_gmacs_takes_the_nearer_side_of_the_step_that_crosses_the_target() -> None:
    def steps(s: float) -> float:  # a non-decreasing step function: 1, 2, 4, 8 GMACs at s in [1,2), [2,3), ...
        return 2.0 ** math.floor(s - 1)

    assert steps(trials.fit_to_gmacs(steps, 4.0, 1.0, 10.0)) == 4.0  # reachable: hit exactly
    assert steps(trials.fit_to_gmacs(steps, 2.5, 1.0, 10.0)) == 2.0  # 2 is nearer 2.5 than 4 (by ratio)
    assert steps(trials.fit_to_gmacs(steps, 3.5, 1.0, 10.0)) == 4.0
    assert trials.fit_to_gmacs(steps, 1e6, 1.0, 10.0) == 10.0  # out of reach: the upper bound


def test_study_members_reach_the_flops_target_each_by_its_own_dimension() -> None:
    plans = trials.study_trials(BASE, ["width", "depth", "resolution", "compound"], [2.0], PAPER_COEFFICIENTS,
                                 num_classes=10)
    assert [p.label for p in plans] == ["baseline", "width x2", "depth x2", "resolution x2", "compound x2"]
    base = trials.member_spec(plans[0].model)
    g0 = trials.member_gmacs(plans[0].model, 10)
    for plan in plans[1:]:
        spec = trials.member_spec(plan.model)
        assert trials.member_gmacs(plan.model, 10) / g0 == pytest.approx(2.0, rel=0.1), plan.label
        changed = {k for k in ("depth_mult", "width_mult", "train_resolution") if getattr(spec, k) != getattr(base, k)}
        assert changed == {"width": {"width_mult"}, "depth": {"depth_mult"}, "resolution": {"train_resolution"},
                           "compound": {"depth_mult", "width_mult", "train_resolution"}}[plan.params["method"]]


@pytest.mark.parametrize("methods, targets, message", [
    (["height"], [2.0], "methods must be among"),
    (["width"], [1.0], "each > 1"),
])
def test_a_bad_study_is_one_clear_error(methods, targets, message) -> None:
    with pytest.raises(ValueError, match=message):
        trials.study_trials(BASE, methods, targets, PAPER_COEFFICIENTS, num_classes=10)


def _outcome(label: str, top1: float, loss: float, error: str | None = None) -> trials.TrialOutcome:
    return trials.TrialOutcome(label, {}, "run", {}, 3, 2, top1, loss, False, error, None)


def test_the_winner_is_the_best_minival_top1_then_the_lower_loss_then_the_earlier_point() -> None:
    assert trials.pick_winner([_outcome("a", 50, 1.0), _outcome("b", 60, 2.0)]).label == "b"
    assert trials.pick_winner([_outcome("a", 60, 1.5), _outcome("b", 60, 1.2)]).label == "b"
    assert trials.pick_winner([_outcome("a", 60, 1.2), _outcome("b", 60, 1.2)]).label == "a"
    assert trials.pick_winner([_outcome("a", 90, 0.1, error="boom"), _outcome("b", 10, 3.0)]).label == "b"
    with pytest.raises(RuntimeError, match="no trial finished"):
        trials.pick_winner([_outcome("a", 90, 0.1, error="boom")])


class _Runs:
    """An MLflow client's run calls in memory, enough to find a run again by its tags."""

    def __init__(self) -> None:
        self.tags: dict[str, dict[str, str]] = {}
        self.status: dict[str, str] = {}

    def search_runs(self, exp_ids: list[str], filter_string: str, max_results: int) -> list:
        from types import SimpleNamespace

        want = dict(c.removeprefix("tags.").split(" = ") for c in filter_string.split(" and "))
        want = {k: v.strip("'") for k, v in want.items()}
        found = [r for r, tags in self.tags.items() if want.items() <= tags.items()]
        return [SimpleNamespace(info=SimpleNamespace(run_id=r)) for r in found[:max_results]]

    def create_run(self, exp_id: str, run_name: str, tags: dict[str, str]):
        from types import SimpleNamespace

        run_id = f"run-{len(self.tags)}"
        self.tags[run_id], self.status[run_id] = dict(tags), "RUNNING"
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id: str, params=()) -> None:
        pass

    def update_run(self, run_id: str, status: str) -> None:
        self.status[run_id] = status

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.tags[run_id][key] = value


def test_a_search_and_its_trials_find_their_runs_again_by_their_tags() -> None:
    from pipelines.registry import tracking
    from pipelines.registry.tracking import Tags

    c = _Runs()
    parent = trials.open_parent_run(c, "0", trials.SEARCH_KIND, "key-1", "search", {}, {Tags.FLOW_RUN: "flow-a"})
    c.status[parent] = "FAILED"
    again = trials.open_parent_run(c, "0", trials.SEARCH_KIND, "key-1", "search", {}, {Tags.FLOW_RUN: "flow-b"})
    assert again == parent and c.status[parent] == "RUNNING" and c.tags[parent][Tags.FLOW_RUN] == "flow-b"
    assert trials.open_parent_run(c, "0", trials.STUDY_KIND, "key-1", "study", {}, {}) != parent  # another kind
    identity = {Tags.SEARCH_KEY: "key-1", Tags.TRIAL: "a"}
    trial = tracking.find_or_start_run(c, "0", identity, "a", {}, new_tags={Tags.PARENT_RUN: parent})
    c.tags[trial][Tags.PARENT_RUN] = "kept"
    assert tracking.find_or_start_run(c, "0", identity, "a", {}, new_tags={Tags.PARENT_RUN: "other"}) == trial
    assert c.tags[trial][Tags.PARENT_RUN] == "kept"  # a found run's tags are not replaced by a new run's
    family = tracking.open_family_run(c, "0", "flow-a", "family", {})
    assert tracking.open_family_run(c, "0", "flow-a", "family", {}) == family != parent


# --- V2's non-uniform depth ---


def test_non_uniform_depth_puts_the_added_blocks_in_the_last_stages() -> None:
    v2_s = [2, 4, 4, 6, 9, 15]
    uniform = stage_repeats(v2_s, 1.5)
    assert uniform == [models.round_repeats(r, 1.5) for r in v2_s] == [3, 6, 6, 9, 14, 23]
    # 21 added blocks shared 9:15 by stages 5 and 6: 7.875 and 13.125, the larger remainder rounds up.
    assert stage_repeats(v2_s, 1.5, late_stages=2) == [2, 4, 4, 6, 17, 28]
    assert sum(stage_repeats(v2_s, 1.5, late_stages=2)) == sum(uniform)
    assert stage_repeats(v2_s, 1.5, late_stages=1) == [2, 4, 4, 6, 9, 36]
    assert stage_repeats(v2_s, 0.5, late_stages=2) == stage_repeats(v2_s, 0.5)  # shrinking stays uniform
    with pytest.raises(ValueError, match="late_depth_stages must be in 1..6"):
        stage_repeats(v2_s, 1.5, late_stages=7)


def test_late_depth_stages_is_a_model_override_that_builds_and_names_itself() -> None:
    spec = resolve_variant("efficientnet_v2_s", depth_mult=1.5, late_depth_stages=2)
    assert spec.name == "efficientnet_v2_s_d1.5_late2"
    per_stage = [sum(1 for b in plan_blocks(spec).blocks if b.stage == i) for i in range(6)]
    assert per_stage == [2, 4, 4, 6, 17, 28]
    assert models.VariantSpec.from_dict(spec.to_dict()) == spec  # checkpoints carry it
    assert resolve_variant("efficientnet_v2_s", late_depth_stages=0).name == "efficientnet_v2_s"
    with pytest.raises(ValueError, match="late_depth_stages must be an int in 0..6"):
        resolve_variant("efficientnet_v2_s", late_depth_stages=9)
    assert ModelConfig(variant="efficientnet_v2_s", late_depth_stages=2).overrides() == {"late_depth_stages": 2}


# --- the study's verdict and plot ---


def _row(method: str, target: float, gmacs: float, top1: float) -> dict:
    return {"method": method, "target": target, "gmacs": gmacs, "gmacs_ratio": gmacs, "val_top1": top1,
            "status": compare.TRAINED}


def test_the_verdict_says_whether_compound_came_out_ahead_at_each_target() -> None:
    rows = [_row("baseline", 1, 1, 40), _row("width", 2, 2.0, 45), _row("compound", 2, 2.1, 47),
            _row("width", 4, 4.0, 52), _row("compound", 4, 3.9, 50)]
    verdict = study_verdict(rows)
    assert "x2: width 45.00 (2.00x GMACs), compound 47.00 (2.10x GMACs): compound ahead by 2.00" in verdict
    assert "x4: width 52.00 (4.00x GMACs), compound 50.00 (3.90x GMACs): compound behind by 2.00" in verdict


def test_the_study_plot_and_table_are_written(tmp_path) -> None:
    rows = [{**_row("baseline", 1, 0.004, 40), "params": 3e5, "variant": "b"},
            {**_row("width", 2, 0.008, 45), "params": 6e5, "variant": "w"},
            {**_row("compound", 2, 0.0081, 47), "params": 5e5, "variant": "c"},
            {"method": "depth", "target": 2, "status": "failed", "reason": "boom"}]
    paths = compare.write_study(rows, tmp_path, "study")
    assert [p.name for p in paths] == list(compare.STUDY_FILES)
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
    assert "failed: boom" in paths[2].read_text()
