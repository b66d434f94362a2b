"""DICOM through the daemon: names it takes, UIDs and population warnings in results.csv, no PHI."""

from __future__ import annotations

import json
from collections.abc import Callable

from pydicom import uid

from tests.conftest import FULLRES
from tests.harness import read_csv_both, run_once
from tests.test_dicom import BIRTH, NAME, fixture_grey, make_dataset, to_bytes
from watcher.config import Config
from watcher.ingest import is_candidate


def dicom(age: str | None, preamble: bool = True, **attrs: object) -> tuple[bytes, str, str, str]:
    ds = make_dataset(fixture_grey(1), **attrs)
    if age is not None:
        ds.PatientAge = age
    ids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return (to_bytes(ds, preamble=preamble), *ids)


class TestCandidates:
    def test_names_a_dicom_may_have(self, make_config: Callable[..., Config]) -> None:
        """.dcm, no extension, or any extension with DICOM bytes are taken; other bytes, links are not."""
        cfg = make_config()
        data = dicom("003Y")[0]
        (cfg.inbox / "a.dcm").write_bytes(data)
        (cfg.inbox / "IM000123").write_bytes(data)
        (cfg.inbox / "IMG.001").write_bytes(data)
        (cfg.inbox / "notes.001").write_bytes(b"not dicom at all" * 20)
        (cfg.inbox / "bare.002").write_bytes(dicom("003Y", preamble=False)[0])
        (cfg.inbox / "linked").symlink_to(cfg.inbox / "a.dcm")
        taken = {p.name for p in cfg.inbox.iterdir() if is_candidate(cfg.inbox, p, cfg.ingest.extensions)}
        assert {"a.dcm", "IM000123", "IMG.001", "bare.002"} == taken


class TestReport:
    def test_uids_and_population_warning_in_the_row_and_no_patient_data(
        self, make_config: Callable[..., Config]
    ) -> None:
        """A child's and an adult's film: UIDs in both rows, a plain-words warning for the adult only."""
        cfg = make_config()
        child, *child_ids = dicom("003Y")
        adult, *adult_ids = dicom("058Y", preamble=False)
        (cfg.inbox / "child.dcm").write_bytes(child)
        (cfg.inbox / "ADULT0001").write_bytes(adult)
        (cfg.inbox / "plain.jpeg").write_bytes(FULLRES[0].read_bytes())
        proc = run_once(cfg)
        assert 0 == proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = {r["file"]: r for r in read_csv_both(cfg.results)}
        assert {"child.dcm", "ADULT0001", "plain.jpeg"} == set(rows)
        for name, ids in (("child.dcm", child_ids), ("ADULT0001", adult_ids)):
            row = rows[name]
            assert "ok" == row["status"], row["error"]
            assert ids == [row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]]
        assert "" == rows["child.dcm"]["warning"]
        assert (
            "patient age 58Y is outside the model's intended population, 1-5 years"
            == rows["ADULT0001"]["warning"]
        )
        assert ("", "", "", "") == tuple(
            rows["plain.jpeg"][k]
            for k in ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "warning")
        )
        text = cfg.results.read_text() + proc.stdout + proc.stderr
        for secret in (str(NAME), BIRTH, "MRN-0042"):
            assert secret not in text, f"{secret!r} leaked into results.csv or the logs"
        done = [json.loads(line) for line in proc.stdout.splitlines() if '"batch_done"' in line]
        assert 1 == sum(e["n_population_warnings"] for e in done)

    def test_a_non_chest_film_is_refused_with_the_reason(self, make_config: Callable[..., Config]) -> None:
        """BodyPartExamined HAND goes to failed/ with the reason; accept_any_body_part scores it."""
        cfg = make_config()
        (cfg.inbox / "hand.dcm").write_bytes(dicom("010Y", BodyPartExamined="HAND")[0])
        assert 0 == run_once(cfg).returncode
        (row,) = read_csv_both(cfg.results)
        assert "failed" == row["status"]
        assert "HAND" in row["error"]
        cfg2 = make_config(dicom={"accept_any_body_part": True}, results="results2.csv")
        (cfg2.inbox / "hand2.dcm").write_bytes(dicom("010Y", BodyPartExamined="HAND")[0])
        assert 0 == run_once(cfg2).returncode
        (row2,) = read_csv_both(cfg2.results)
        assert "ok" == row2["status"], row2["error"]
        assert uid.UID(row2["sop_instance_uid"]).is_valid


class TestBackfill:
    def test_backfill_rows_carry_uids_and_the_warning_too(self, make_config: Callable[..., Config]) -> None:
        """The archive path gives a DICOM the same UIDs and population warning as the daemon."""
        import pandas as pd

        from watcher.backfill import backfill

        cfg = make_config()
        archive = cfg.inbox.parent / "archive"
        archive.mkdir()
        adult, *ids = dicom("058Y")
        (archive / "ADULT0001").write_bytes(adult)
        out = cfg.inbox.parent / "out"
        backfill(archive, out, engine="local", store=cfg.model_store, batch_size=4)
        (row,) = pd.read_parquet(out).to_dict("records")
        assert "ok" == row["status"]
        assert ids == [row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]]
        assert row["warning"].startswith("patient age 58Y is outside")
