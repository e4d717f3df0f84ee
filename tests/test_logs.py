"""What a failing rule shows: one actionable line for bad input, the whole story in its log."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "rule_script.py"
    script.write_text(textwrap.dedent(f"""
        from histoflow.logs import log_to
        from histoflow.errors import InputError
        with log_to({str(tmp_path / 'logs' / 'rule.log')!r}):
            print("working")
            {body}
    """))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


def test_bad_input_gives_one_line_on_the_terminal_and_the_traceback_in_the_log(tmp_path):
    proc = _run_script(tmp_path, "raise InputError(\"slide 'S1': no µm/px; set the sheet's mpp or default_mpp\")")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("histoflow: slide 'S1': no µm/px"), proc.stderr
    assert "rule.log" in lines[0]                      # says where the details are
    log = (tmp_path / "logs" / "rule.log").read_text()
    assert "working" in log and "Traceback" in log and "InputError" in log


def test_a_bug_keeps_its_traceback_on_the_terminal(tmp_path):
    proc = _run_script(tmp_path, "raise KeyError('oops')")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError" in proc.stderr
    assert "Traceback" in (tmp_path / "logs" / "rule.log").read_text()
