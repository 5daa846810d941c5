"""The benchmark scripts' shared argument checks and exit status (no timing here)."""

import argparse

import pytest

from benchmarks import busy_machine_note, positive


def test_positive_numbers_only():
    assert positive(float)("2.5") == 2.5 and positive(int)("3") == 3
    for kind, text in ((float, "0"), (float, "-1"), (float, "nan"), (float, "inf"),
                       (int, "0"), (int, "2.5"), (float, "ten")):
        with pytest.raises(argparse.ArgumentTypeError):
            positive(kind)(text)


def test_busy_machine_note(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (1.5, 1.0, 1.0))
    assert "OMP_WAIT_POLICY=PASSIVE" in busy_machine_note(2)
    assert busy_machine_note(0.5) is None  # fits beside the load
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert busy_machine_note(2) is None


def test_rtf_benchmark_fails_when_no_row_runs(tmp_path, capsys):
    from benchmarks import bench_rtf

    assert bench_rtf.main(["--durations", "1", "--only", "no such model",
                           "--work-dir", str(tmp_path)]) == 1
    assert "no row ran: no model name contains 'no such model'" in capsys.readouterr().err
