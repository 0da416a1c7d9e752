"""`tcptrace doctor` shows the quick checks before it compiles (which takes seconds)."""

from __future__ import annotations

import pytest

from tcptrace.commands import doctor
from tcptrace.views.doctor import Check


def test_quick_checks_are_shown_before_the_compile(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    quick = [Check("privileges", True, "root"), Check("tracepoint sock:inet_sock_set_state", True, "present")]
    monkeypatch.setattr(doctor, "quick_checks", lambda: (list(quick), None, True))
    seen_before: list[str] = []

    def attach(_btf: object) -> Check:
        seen_before.append(capsys.readouterr().out)
        return Check("compile and attach", False, "clang said no", "run scripts/install as root")

    monkeypatch.setattr(doctor, "_attach_check", attach)
    with pytest.raises(SystemExit) as exit_:
        doctor.run()
    assert exit_.value.code == 1
    (before,) = seen_before
    assert "privileges" in before and "sock:inet_sock_set_state" in before and "compile" not in before
    after = capsys.readouterr().out
    assert "compile and attach" in after and "1 check(s) failed" in after
    # One name column for all, the compile's line included: every detail starts at one column.
    lines = [line for line in (before + after).splitlines() if line[:5].strip() in ("ok", "FAIL")]
    details = ["root", "present", "clang said no"]
    assert len(lines) == 3 and len({line.index(d) for line, d in zip(lines, details, strict=True)}) == 1


def test_no_compile_when_a_required_check_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = [Check("bcc", False, "no module named bcc", "run scripts/install as root")]
    monkeypatch.setattr(doctor, "quick_checks", lambda: (list(failed), None, False))
    monkeypatch.setattr(doctor, "_attach_check", lambda _btf: pytest.fail("compiled without bcc"))
    with pytest.raises(SystemExit):
        doctor.run()
