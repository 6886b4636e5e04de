"""The ledger: SQLite rows that are only ever added or completed, and results.tsv beside them."""
import sqlite3

import pytest

from autoresearch.lab.ledger import RESULTS_HEADER, SCHEMA_VERSION, Ledger, LedgerVersionError, Trial


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.db", tmp_path / "results.tsv")
    yield led
    led.close()


def add(ledger, description, status, val_bpb=None, mem=None, sha="abcdef1234"):
    tid = ledger.begin(kind="candidate", proposer="test", description=description, commit_sha=sha,
                       parent_sha=None, diff="--- a\n+++ b\n", seed=None)
    ledger.update(tid, status=status, val_bpb=val_bpb, peak_vram_mb=mem, decision={"why": "test"})
    return tid


def test_results_tsv_follows_the_reference_format(ledger, tmp_path):
    add(ledger, "baseline", "keep", 0.997900, 45060.2)
    add(ledger, "double the\tbatch\nsize", "discard", 1.0051, 44000.0)
    add(ledger, "OOM", "crash")
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert lines[0] == RESULTS_HEADER == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert lines[1] == "abcdef1\t0.997900\t44.0\tkeep\tbaseline"
    assert lines[2] == "abcdef1\t1.005100\t43.0\tdiscard\tdouble the batch size"  # one line, five fields
    assert lines[3] == "abcdef1\t0.000000\t0.0\tcrash\tOOM"


def test_a_running_trial_is_in_the_ledger_but_not_yet_in_results_tsv(ledger, tmp_path):
    ledger.begin(kind="baseline", proposer="baseline", description="baseline", commit_sha="a" * 40,
                 parent_sha=None, diff="", seed=None)
    assert [t.status for t in ledger.trials()] == ["running"]
    assert (tmp_path / "results.tsv").read_text().splitlines() == [RESULTS_HEADER]


def test_rows_and_json_fields_round_trip(ledger):
    tid = add(ledger, "x", "keep", 1.0)
    ledger.update(tid, hardware={"gpu": "H100"}, trainer_summary={"num_steps": 953.0})
    t = ledger.trial(tid)
    assert (t.hardware, t.trainer_summary, t.decision) == ({"gpu": "H100"}, {"num_steps": 953.0}, {"why": "test"})
    assert t.ended_at is not None and t.ended_at >= t.started_at
    with pytest.raises(ValueError, match="unknown trial fields"):
        ledger.update(tid, favourite_colour="blue")


def test_the_database_is_in_wal_mode_and_readable_while_open(ledger, tmp_path):
    add(ledger, "x", "keep", 1.0)
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader = sqlite3.connect(f"file:{tmp_path / 'ledger.db'}?mode=ro", uri=True)
    assert reader.execute("SELECT count(*) FROM trials").fetchone()[0] == 1


def test_meta_values_persist(ledger, tmp_path):
    ledger.set_meta("sigma", 0.0007)
    again = Ledger(tmp_path / "ledger.db")
    assert again.get_meta("sigma") == 0.0007
    assert again.get_meta("schema_version") == SCHEMA_VERSION


def test_a_ledger_from_a_newer_version_is_refused_clearly(ledger, tmp_path):
    ledger.set_meta("schema_version", SCHEMA_VERSION + 1)
    with pytest.raises(LedgerVersionError, match="newer autoresearch"):
        Ledger(tmp_path / "ledger.db")


def test_a_row_of_another_ledger_version_reads_with_defaults_for_what_it_lacks():
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    db.execute("CREATE TABLE trials (id INTEGER, kind TEXT, val_bpb REAL, decision TEXT, from_the_future TEXT)")
    db.execute("INSERT INTO trials VALUES (7, 'baseline', 1.5, 'not json', 'ignored')")
    trial = Trial.from_row(db.execute("SELECT * FROM trials").fetchone())
    assert (trial.id, trial.kind, trial.val_bpb) == (7, "baseline", 1.5)
    assert trial.decision == {} and trial.hardware == {}  # unreadable or missing JSON reads as empty
    assert (trial.status, trial.description, trial.commit_sha, trial.started_at) == ("running", "", None, 0.0)
