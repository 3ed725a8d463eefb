"""The GPU benchmark's own logic, on any machine: the batch search, the budget, the report written after every
part, and what it says it skipped (the GPU figures themselves need a CUDA machine: `make bench-gpu`)."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu


@pytest.mark.parametrize("fits_up_to, start, limit, expected", [
    (1000, 64, 2048, 512),  # doubles while it fits: 64, 128, 256, 512 (1024 does not)
    (5000, 64, 2048, 2048),  # stops at the limit
    (32, 64, 2048, 0),  # not even the start
])
def test_the_batch_search_doubles_until_it_does_not_fit(fits_up_to, start, limit, expected) -> None:
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= fits_up_to

    assert gpu.largest_batch_by_doubling(fits, start, limit) == expected
    assert tried == sorted(tried) and all(b <= limit for b in tried)


def test_each_part_is_written_as_it_ends_and_the_skipped_ones_say_why(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    report = gpu.Report(out, {"torch": "x"})
    report.part("models", {"skipped": gpu.NO_CUDA})
    assert json.loads(out.read_text())["parts"] == {"models": {"skipped": gpu.NO_CUDA}}  # a cut run keeps it
    report.part("data", {"wds_cpu": {"images_per_s": 10.0}, "dali_mixed": {"skipped": "no GPU"}})
    assert gpu.skipped_parts(json.loads(out.read_text())["parts"]) == [f"models: {gpu.NO_CUDA}",
                                                                       "data.dali_mixed: no GPU"]


def test_a_part_past_the_budget_is_skipped_saying_so() -> None:
    budget = gpu.Budget(10)
    assert budget.skip_reason("job", 5) is None
    assert "job: skipped" in budget.skip_reason("job", 60) and "budget" in budget.skip_reason("job", 60)
