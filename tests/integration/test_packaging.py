"""tcptrace as an installed package (#19): a wheel traces from a fresh venv outside the
checkout, and kernel headers are found per process, with nothing linked into /lib/modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import states_json_of_one_connection

ROOT = Path(__file__).resolve().parents[2]
# What would make a run use anything but the installed package and its own choices.
SCRUBBED = ("PYTHONPATH", "PYTHONHOME", "TCPTRACE_BPF_DIR", "BCC_KERNEL_SOURCE")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SCRUBBED}


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv made like a user's (from /usr/bin/python3, seeing Debian's bcc) with only the
    wheel of this tree installed in it."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs /usr/bin/python3 (Debian's, with bcc)")
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files git knows, so the checkout gets no build/ or egg-info.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tree = work / "tree"
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    dist = work / "dist"
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(tree),
        ],
        cwd=work,
    )
    assert built.returncode == 0, built.stderr
    wheels = list(dist.glob("tcptrace-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    made = run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], cwd=work)
    assert made.returncode == 0, made.stderr
    installed = run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheels[0])], cwd=work)
    assert installed.returncode == 0, installed.stderr
    shutil.rmtree(tree)
    yield venv


def test_the_wheel_carries_the_programs_and_imports_from_the_venv(wheel_venv: Path) -> None:
    probe = run(
        [
            str(wheel_venv / "bin/python"),
            "-c",
            "import tcptrace.kernel.loader as l\nwith l.bpf_sources() as d: print(d)",
        ],
        cwd=wheel_venv.parent,
    )
    assert probe.returncode == 0, probe.stderr
    programs = Path(probe.stdout.strip())
    assert programs.is_relative_to(wheel_venv), programs  # the wheel's, not the checkout's
    names = {p.name for p in programs.iterdir()}
    assert {"tcptrace.h", "common.bpf.h", "sock.bpf.h", "lifecycle.bpf.c", "timewait.bpf.c"} <= names


def test_doctor_from_the_wheel_compiles_every_program(wheel_venv: Path) -> None:
    doctor = run([str(wheel_venv / "bin/tcptrace"), "doctor"], cwd=wheel_venv.parent)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    lines = doctor.stdout.splitlines()
    assert any(line.startswith("ok   kernel headers") for line in lines), doctor.stdout
    assert any(line.startswith("ok   compile and attach") for line in lines), doctor.stdout


def test_states_from_the_wheel_traces_for_two_seconds(wheel_venv: Path, port: int) -> None:
    done, objs, conn = states_json_of_one_connection(
        [str(wheel_venv / "bin/tcptrace")], port, "2", cwd=wheel_venv.parent, env=clean_env()
    )
    assert done.returncode == 0, done.stderr
    assert objs[-1]["type"] == "summary" and objs[-1]["stopped"] == "duration" and objs[-1]["lost"] == 0
    events = [o for o in objs if o["type"] == "transition"]
    assert any(o["sport"] == conn.client_port and o["new"] == "FIN_WAIT1" for o in events), events


def test_without_lib_modules_the_nearest_headers_serve_this_process_only(tcptrace_cmd: list[str]) -> None:
    """/lib/modules and /var/lib hidden in a private mount namespace: as on a machine whose
    distribution packages no headers for the running kernel. tcptrace finds them under
    /usr/src and hands them to bcc through BCC_KERNEL_SOURCE; nothing changes outside."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    release = os.uname().release
    modules_before = sorted(os.listdir("/lib/modules"))
    script = (
        "mount -t tmpfs -o mode=0755 none /lib/modules && mount -t tmpfs -o mode=0755 none /var/lib"
        ' && exec "$@"'
    )
    doctor = run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *tcptrace_cmd, "doctor"],
        cwd=ROOT,
    )
    headers = [
        line for line in doctor.stdout.splitlines() if line.startswith(("ok   kernel headers", "FAIL"))
    ]
    if any("no kernel headers" in line for line in headers):
        pytest.skip(f"no kernel headers under /usr/src for {release}'s architecture")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert any("via BCC_KERNEL_SOURCE=" in line for line in headers), doctor.stdout
    assert any(line.startswith("ok   compile and attach") for line in doctor.stdout.splitlines()), (
        doctor.stdout
    )
    assert sorted(os.listdir("/lib/modules")) == modules_before
    assert "BCC_KERNEL_SOURCE" not in os.environ
