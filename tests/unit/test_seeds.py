"""One seed-mixing rule for every random stream: each part, its place and the number of parts count."""

from __future__ import annotations

import pytest

from pipelines.seeds import SEED_BITS, Stream, mix_seed


def test_every_part_its_place_and_the_number_of_parts_count() -> None:
    seeds = [mix_seed(*parts) for parts in [(1,), (1, 0), (1, 0, 0), (0, 1), (1, 2), (2, 1), (2, 0)]]
    assert len(set(seeds)) == len(seeds)  # (1, 0) is not (1,): a rank-0 stream is not its epoch's
    assert mix_seed(7, 3, 1) == mix_seed(7, 3, 1)
    assert all(0 <= s < 2**SEED_BITS for s in seeds)


def test_streams_of_the_same_numbers_differ() -> None:
    assert len({mix_seed(0, stream, 0) for stream in Stream}) == len(Stream)
    assert min(Stream) > 10**6  # above any epoch: never the second part of an untagged stream


@pytest.mark.parametrize("parts", [(), (-1,), (True,), (1.5,), ("1",)])
def test_parts_are_whole_numbers_at_least_zero(parts: tuple) -> None:
    with pytest.raises(ValueError, match="seed parts"):
        mix_seed(*parts)
