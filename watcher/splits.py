"""Patient-level validation splits of a training folder (``NORMAL/``, ``PNEUMONIA/``).

Patient ids come from the file names of the Kermany et al. chest X-ray set:

- ``IM-0115-0001.jpeg``, ``IM-0429-0001-0002.jpeg``          -> NORMAL patient 115, series ``IM``
- ``NORMAL2-IM-0115-0001.jpeg``                              -> NORMAL patient 115, series ``NORMAL2-IM``
- ``person1453_bacteria_3770.jpeg``, ``person1453_virus_..`` -> PNEUMONIA patient 1453, series ``person``

``IM-0115`` and ``NORMAL2-IM-0115`` are treated as the *same* patient (group ``IM:115``).
The data set's README says so; the two series may in fact be numbered independently (their
ranges overlap on 211 ids), but merging two groups can only make a split coarser, never leak
a patient, so merging is the safe reading. ``person`` ids are a separate namespace.

A name that matches no known pattern becomes its own group (``file:<name>``) and a warning
is logged: it cannot be matched to other images of the same patient.

Two splits, both deterministic and made per class so both sides keep the class balance:

- ``random``: patients shuffled with ``seed``; the first ``val_fraction`` of each class
  go to validation.
- ``era``: the *oldest* patients of each class go to validation. Age is the patient's rank
  within its numbering series (``IM``, ``NORMAL2-IM``, ``person``), as a fraction 0..1, taking
  the lowest over the patient's files; the withheld official test split is made of lower ids
  than the training folder, so this is the split that resembles it. Unknown-name groups have
  no age and stay on the training side. ``seed`` only breaks exact ties.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger()

SplitMethod = Literal["era", "random"]
SPLIT_METHODS: tuple[str, ...] = ("era", "random")
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm"})

_NORMAL_RE = re.compile(r"^(?P<series>(?:NORMAL2-)?IM)-(?P<id>\d+)(?:-\d+)+\.[A-Za-z]+$", re.I)
_PERSON_RE = re.compile(r"^(?P<series>person)(?P<id>\d+)_(?:bacteria|virus)(?:_\d+)+\.[A-Za-z]+$", re.I)


@dataclass(frozen=True)
class PatientKey:
    """Who an image belongs to: ``group`` is the leak-relevant identity."""

    group: str  # e.g. "IM:115", "person:1453", "file:odd.jpeg"
    series: str  # numbering series, e.g. "NORMAL2-IM"; "" when unknown
    number: int  # id within the series; -1 when unknown


def patient_key(file_name: str) -> PatientKey:
    """Parse a file name into its patient group (unknown patterns: a group of their own)."""
    name = Path(file_name).name
    m = _NORMAL_RE.match(name)
    if m:
        number = int(m.group("id"))
        return PatientKey(f"IM:{number}", m.group("series").upper(), number)
    m = _PERSON_RE.match(name)
    if m:
        number = int(m.group("id"))
        return PatientKey(f"person:{number}", "person", number)
    return PatientKey(f"file:{name}", "", -1)


def patient_id(file_name: str) -> str:
    """The patient group of a file name, e.g. ``'IM:115'`` or ``'person:1453'``."""
    return patient_key(file_name).group


@dataclass(frozen=True)
class Sample:
    """One labelled image file."""

    path: Path
    label: int  # 0 NORMAL, 1 PNEUMONIA

    @property
    def group(self) -> str:
        """The patient group, namespaced by class (a label never shares a group)."""
        return f"{self.label}/{patient_id(self.path.name)}"


@dataclass(frozen=True)
class Split:
    """Indices into the sample list, one patient never on both sides."""

    method: str
    seed: int
    val_fraction: float
    train: tuple[int, ...]
    val: tuple[int, ...]
    train_patients: dict[str, int]  # per class name
    val_patients: dict[str, int]
    unknown_names: int

    def summary(self) -> dict[str, object]:
        """JSON form for metadata.json."""
        return {
            "method": self.method,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train_images": len(self.train),
            "val_images": len(self.val),
            "train_patients": self.train_patients,
            "val_patients": self.val_patients,
            "unknown_name_groups": self.unknown_names,
        }


CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def class_folder_problem(data_dir: Path) -> str | None:
    """Why ``data_dir`` is not a labelled folder (one with ``NORMAL/`` and ``PNEUMONIA/``), or None."""
    if not data_dir.is_dir():
        missing = "the folder itself"
    else:
        missing = ", ".join(c for c in CLASS_NAMES if not (data_dir / c).is_dir())
    if not missing:
        return None
    return f"{data_dir} must hold NORMAL/ and PNEUMONIA/ subfolders; missing: {missing}"


def list_samples(data_dir: Path) -> list[Sample]:
    """Image files under ``NORMAL/`` and ``PNEUMONIA/`` (sorted, so order is reproducible)."""
    out: list[Sample] = []
    for label, cls in enumerate(CLASS_NAMES):
        folder = data_dir / cls
        if not folder.is_dir():
            continue
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        out.extend(Sample(p, label) for p in files)
    return out


def _era_scores(names: Sequence[str]) -> dict[str, float]:
    """Per patient group: lowest rank (0 oldest .. 1 newest) of its ids within their series."""
    by_series: dict[str, set[int]] = defaultdict(set)
    keys = [patient_key(n) for n in names]
    for k in keys:
        if k.series:
            by_series[k.series].add(k.number)
    rank: dict[tuple[str, int], float] = {}
    for series, numbers in by_series.items():
        ordered = sorted(numbers)
        denom = max(len(ordered) - 1, 1)
        for i, num in enumerate(ordered):
            rank[(series, num)] = i / denom
    scores: dict[str, float] = {}
    for k in keys:
        score = rank[(k.series, k.number)] if k.series else float("inf")
        scores[k.group] = min(scores.get(k.group, float("inf")), score)
    return scores


def _n_val(val_fraction: float, n_groups: int) -> int:
    """Validation patients of a class: the rounded fraction, but at least one on each side."""
    if n_groups < 2:
        return 0
    return min(max(round(val_fraction * n_groups), 1), n_groups - 1)


def split_samples(
    samples: Sequence[Sample], method: str = "era", val_fraction: float = 0.2, seed: int = 1337
) -> Split:
    """Split samples by patient, per class; deterministic for a given method and seed."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r} (expected one of {SPLIT_METHODS})")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    unknown = sorted({s.path.name for s in samples if patient_key(s.path.name).series == ""})
    for name in unknown[:20]:
        log.warning(
            "split_unknown_file_name",
            file=name,
            hint="no patient id in the name; the file forms a patient group of its own",
        )
    if len(unknown) > 20:
        log.warning("split_unknown_file_names_more", count=len(unknown) - 20)
    val_groups: set[str] = set()
    train_patients: dict[str, int] = {}
    val_patients: dict[str, int] = {}
    for label, cls in enumerate(CLASS_NAMES):
        members = [s for s in samples if s.label == label]
        groups = sorted({s.group for s in members})
        if method == "random":
            rng.shuffle(groups)
            chosen = groups[: _n_val(val_fraction, len(groups))]
        else:
            scores = _era_scores([s.path.name for s in members])
            tiebreak = {g: rng.random() for g in groups}

            def era_order(
                g: str, scores: dict[str, float] = scores, tiebreak: dict[str, float] = tiebreak
            ) -> tuple[float, float]:
                return (scores[g.split("/", 1)[1]], tiebreak[g])

            dated = [g for g in groups if scores[g.split("/", 1)[1]] != float("inf")]
            n_val = min(_n_val(val_fraction, len(groups)), len(dated))
            chosen = sorted(dated, key=era_order)[:n_val]
        val_groups.update(chosen)
        val_patients[cls] = len(chosen)
        train_patients[cls] = len(groups) - len(chosen)
    train_idx = tuple(i for i, s in enumerate(samples) if s.group not in val_groups)
    val_idx = tuple(i for i, s in enumerate(samples) if s.group in val_groups)
    return Split(method, seed, val_fraction, train_idx, val_idx, train_patients, val_patients, len(unknown))


def leaked_groups(samples: Sequence[Sample], split: Split) -> set[str]:
    """Patient groups found on both sides (empty for a sound split)."""
    train = {samples[i].group for i in split.train}
    val = {samples[i].group for i in split.val}
    return train & val


def count_by_class(labels: Iterable[int]) -> dict[str, int]:
    """Images per class name."""
    counts = {cls: 0 for cls in CLASS_NAMES}
    for lab in labels:
        counts[CLASS_NAMES[lab]] += 1
    return counts
