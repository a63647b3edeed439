import itertools
from collections import Counter

import pytest

from emu_lightning.data.streaming import DataSourceError, Skip, StreamingSource, batch_skips, split_units


class Units(StreamingSource):
    """Unit ``u`` yields ``per_unit`` samples, or only skips when ``u`` is in ``bad``."""

    def __init__(self, num_units=4, per_unit=3, bad=(), **kwargs):
        super().__init__("toy", **kwargs)
        self.num_units, self.per_unit, self.bad = num_units, per_unit, set(bad)

    def units(self):
        return list(range(self.num_units))

    def read(self, unit, rng):
        for k in range(self.per_unit):
            yield Skip("broken", f"{unit}/{k}") if unit in self.bad else {"items": [f"{unit} {k}"], "id": (unit, k)}


def test_split_units_is_disjoint_and_covers():
    units = list(range(11))
    parts = [split_units(units, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(itertools.chain(*parts)) == units
    assert parts[0] == [0, 6] and parts[5] == [5]
    with pytest.raises(ValueError, match="bad split"):
        split_units(units, 2, 2, 0, 1)


def test_skips_ride_on_the_next_sample_and_are_counted():
    source = Units(bad={1}, shuffle=False, repeat=False)
    samples = list(source)
    assert [s["id"] for s in samples] == [(u, k) for u in (0, 2, 3) for k in range(3)]
    assert samples[3]["skipped"] == {"broken": 3} and all(s["skipped"] is None for s in samples[4:])
    assert source.skipped == Counter(broken=3)
    assert source.check() == {"ok": 9, "skipped": 3, "reasons": {"broken": 3}}
    assert source.skip_examples == {"broken": "1/0"}
    batch = {"source": [s["source"] for s in samples], "skipped": [s["skipped"] for s in samples]}
    assert batch_skips(batch) == {"toy": Counter(broken=3)}


def test_a_wholly_bad_source_raises_with_its_reasons():
    with pytest.raises(DataSourceError, match=r"none of the samples in 4 units could be used \(12 skipped; broken: 12; "
                       r"e.g. broken: \d/0\)"):  # fmt: skip
        list(Units(bad=range(4), repeat=False))


def test_a_process_with_only_bad_units_reads_everything_instead_of_stalling(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 gets units 1 and 3, both bad
    with pytest.warns(UserWarning, match="hold no usable sample; it reads all units"):
        ids = [s["id"] for s in itertools.islice(Units(bad={1, 3}, shuffle=False), 6)]
    assert ids == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2)]
    assert list(Units(bad={1, 3}, repeat=False)) == []  # a one-pass read just ends


def test_new_iterations_continue_with_new_passes():
    source = Units(num_units=6, per_unit=1)
    first = [s["id"] for s in itertools.islice(source, 6)]
    second = [s["id"] for s in itertools.islice(source, 6)]  # a restarted loader: not a replay of the first
    assert sorted(first) == sorted(second) == [(u, 0) for u in range(6)] and first != second
    assert [s["id"] for s in itertools.islice(Units(num_units=6, per_unit=1), 6)] == first  # seeded
