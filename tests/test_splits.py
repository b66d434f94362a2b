"""Patient ids from file names and patient-level validation splits."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.splits import Sample, leaked_groups, list_samples, patient_id, patient_key, split_samples

TRAIN_FIXTURES = Path(__file__).parent / "fixtures" / "train"


class TestPatientId:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("IM-0115-0001.jpeg", "IM:115"),
            ("NORMAL2-IM-0115-0001.jpeg", "IM:115"),
            ("IM-0429-0001-0002.jpeg", "IM:429"),
            ("normal2-im-1227-0001.JPG", "IM:1227"),
            ("person1453_bacteria_3770.jpeg", "person:1453"),
            ("person1453_virus_2411.jpeg", "person:1453"),
            ("person447_virus_921_1.jpeg", "person:447"),
            ("scan_2024.png", "file:scan_2024.png"),
        ],
    )
    def test_known_and_unknown_patterns(self, name: str, expected: str) -> None:
        """Known name patterns give the patient; unknown names form a group of their own."""
        assert expected == patient_id(name)

    def test_series_recorded(self) -> None:
        """The numbering series is kept apart from the merged patient group (for era ranks)."""
        assert patient_key("NORMAL2-IM-0383-0001.jpeg").series == "NORMAL2-IM"
        assert patient_key("IM-0383-0001.jpeg").series == "IM"


def _samples(names: list[tuple[str, int]]) -> list[Sample]:
    return [Sample(Path(("NORMAL", "PNEUMONIA")[lab]) / n, lab) for n, lab in names]


_name = st.one_of(
    st.builds(lambda i, k: (f"IM-{i:04d}-{k:04d}.jpeg", 0), st.integers(1, 60), st.integers(1, 3)),
    st.builds(lambda i, k: (f"NORMAL2-IM-{i:04d}-{k:04d}.jpeg", 0), st.integers(1, 60), st.integers(1, 3)),
    st.builds(
        lambda i, kind, k: (f"person{i}_{kind}_{k}.jpeg", 1),
        st.integers(1, 60),
        st.sampled_from(["bacteria", "virus"]),
        st.integers(1, 500),
    ),
    st.builds(
        lambda t, lab: (f"odd-{t}.png", lab), st.text("abcxyz", min_size=1, max_size=6), st.integers(0, 1)
    ),
)


class TestSplit:
    @settings(max_examples=60, deadline=None)
    @given(
        names=st.lists(_name, min_size=2, max_size=80, unique=True),
        method=st.sampled_from(["era", "random"]),
        seed=st.integers(0, 10_000),
        fraction=st.floats(0.05, 0.6),
    )
    def test_no_patient_on_both_sides(
        self, names: list[tuple[str, int]], method: str, seed: int, fraction: float
    ) -> None:
        """Whatever the names, method, seed and fraction, no patient group is on both sides."""
        samples = _samples(names)
        split = split_samples(samples, method, fraction, seed)
        assert set() == leaked_groups(samples, split)
        assert sorted(split.train + split.val) == list(range(len(samples)))

    def test_im_and_normal2_same_number_stay_together(self) -> None:
        """IM-0115 and NORMAL2-IM-0115 are one patient, so they land on the same side."""
        names = [(f"IM-{i:04d}-0001.jpeg", 0) for i in range(100, 130)]
        names += [(f"NORMAL2-IM-{i:04d}-0001.jpeg", 0) for i in range(100, 130)]
        names += [(f"person{i}_virus_{i}.jpeg", 1) for i in range(30)]
        samples = _samples(names)
        for method in ("era", "random"):
            split = split_samples(samples, method, 0.3, 7)
            side = {samples[i].path.name: "val" for i in split.val}
            for i in range(100, 130):
                assert side.get(f"IM-{i:04d}-0001.jpeg") == side.get(f"NORMAL2-IM-{i:04d}-0001.jpeg")

    def test_era_holds_out_oldest(self) -> None:
        """The era split validates on the lowest ids of each series and class."""
        names = [(f"IM-{i:04d}-0001.jpeg", 0) for i in range(1, 21)]
        names += [(f"person{i}_bacteria_{i}.jpeg", 1) for i in range(1, 21)]
        samples = _samples(names)
        split = split_samples(samples, "era", 0.2, 1)
        val = sorted(patient_id(samples[i].path.name) for i in split.val)
        assert val == ["IM:1", "IM:2", "IM:3", "IM:4", "person:1", "person:2", "person:3", "person:4"]

    def test_deterministic(self) -> None:
        """The same seed gives the same split; another seed a different random one."""
        samples = list_samples(TRAIN_FIXTURES)
        a = split_samples(samples, "random", 0.3, 5)
        assert a == split_samples(samples, "random", 0.3, 5)
        assert {split_samples(samples, "random", 0.3, s).val for s in range(10)} != {a.val}

    def test_fixture_folder(self) -> None:
        """The fixture folder keeps patient 1000's two images together and both classes in validation."""
        samples = list_samples(TRAIN_FIXTURES)
        assert len(samples) == 17
        split = split_samples(samples, "era", 0.2, 1337)
        assert set() == leaked_groups(samples, split)
        assert split.val_patients == {"NORMAL": 2, "PNEUMONIA": 2}
        val_names = {samples[i].path.name for i in split.val}
        assert {"person51_bacteria_247.jpeg", "person154_virus_305.jpeg"} <= val_names

    def test_bad_method(self) -> None:
        """An unknown split method is a ValueError naming the choices."""
        with pytest.raises(ValueError, match="era"):
            split_samples([], "kfold")
