"""The GPU tier's driver (``bench/gpu_tier.py``): stages in their own processes, timeouts, budget,
results written as each stage ends. The whole rehearsal runs in CI (``.ci/run``); these tests pin
the behaviours a cut-off GPU window depends on, with tiny stand-in test files."""
import json
import sys

import pytest

from vitkern.bench import gpu_tier


def _tier(tmp_path, budget=120.0, stages=("correctness",)):
    return gpu_tier.Tier(tmp_path / "out", budget, rehearse=True, stages=list(stages))


def test_a_crashing_family_does_not_hide_the_others(tmp_path, monkeypatch):
    crash = tmp_path / "test_crash.py"
    crash.write_text("import os\n\ndef test_crash():\n    os.abort()\n")
    ok = tmp_path / "test_ok.py"
    ok.write_text("def test_one():\n    assert 1 + 1 == 2\n\ndef test_two():\n    pass\n")
    monkeypatch.setattr(gpu_tier, "FAMILIES", {"crash": [str(crash)], "ok": [str(ok)]})
    tier = _tier(tmp_path)
    assert tier.main() == 1
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())["stages"]["correctness"]
    assert summary["status"] == "failed (1 of 2 families)"
    assert "crash: failed" in summary["detail"] and "ok: passed" in summary["detail"]
    junit = (out / "junit-ok.xml").read_text()
    assert 'tests="2"' in junit and 'failures="0"' in junit
    assert (out / "crash.log").exists()


def test_a_stage_is_cut_at_its_timeout(tmp_path):
    tier = _tier(tmp_path)
    status = tier.run("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0)
    assert status == "timeout"
    assert "timeout after 1 s" in (tmp_path / "out" / "sleeper.log").read_text()


def test_budget_skips_what_no_longer_fits_and_says_so(tmp_path):
    tier = _tier(tmp_path, budget=30, stages=("correctness", "sanitizer", "bench", "approve"))
    assert tier.main() == 0
    text = (tmp_path / "out" / "summary.txt").read_text()
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert set(lines) == {"correctness", "sanitizer", "bench", "approve"}
    assert lines["correctness"].startswith("skipped (budget: needs ~80 s, 30 s left)")
    assert lines["sanitizer"].startswith("skipped (no device)")
    assert lines["bench"].startswith("skipped (budget")
    assert lines["approve"].startswith("skipped (no bench results")


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_tier.main(["--stages", "correctness,warp_drive", "--rehearse"])
    assert "warp_drive" in capsys.readouterr().err


def test_tests_past_the_deadline_are_skipped_and_the_report_is_written(tmp_path):
    """A stage out of time still ends its pytest session (tests/conftest.py's deadline)."""
    tier = _tier(tmp_path)
    junit = tmp_path / "out" / "junit-late.xml"
    env = dict(tier.env, VITKERN_TEST_DEADLINE="1", VITKERN_TEST_LIMIT="0")  # long past
    status = tier.run("late", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={junit}",
                               "tests/test_gpu_tier.py::test_unknown_stage_is_refused"], 120, env)
    assert status == "passed"
    assert 'skipped="1"' in junit.read_text() and "time is spent" in junit.read_text()
