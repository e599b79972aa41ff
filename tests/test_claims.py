"""Per-video claims between processes on one output folder (real processes,
real kills)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lightning_ft.claims import claim, claim_path, release, try_claim

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def test_a_held_claim_is_not_given_twice_and_is_released(tmp_path):
    folder = tmp_path / "out" / "clip"
    with claim(folder) as first:
        assert first and claim_path(folder).exists()
        owner = json.loads(claim_path(folder).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"] > 0
        second = try_claim(folder)
        assert not second and second.owner["token"] == first.owner["token"]
        assert f"pid {os.getpid()}" in second.describe()
    assert not claim_path(folder).exists()
    with claim(folder) as again:
        assert again


def test_claim_of_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "clip"
    code = ("import os, signal, sys; from lightning_ft.claims import try_claim; "
            "assert try_claim(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], env=ENV)
    assert proc.returncode == -signal.SIGKILL
    left = json.loads(claim_path(folder).read_text())
    assert left["pid"] != os.getpid()
    held = try_claim(folder)
    assert held and held.owner["pid"] == os.getpid()
    release(held)


def test_claim_from_another_host_is_stale_only_after_a_long_time(tmp_path):
    folder = tmp_path / "clip"
    path = claim_path(folder)
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "started": time.time(), "token": "x"}))
    assert not try_claim(folder, stale_after=3600)
    old = time.time() - 7200
    os.utime(path, (old, old))
    held = try_claim(folder, stale_after=3600)
    assert held
    # the previous owner's release does not remove the new claim
    from lightning_ft.claims import Claim

    release(Claim(path, True, {"token": "x"}))
    assert path.exists()
    release(held)
    assert not path.exists()


_RACE = """
import sys, time
from pathlib import Path
from lightning_ft.claims import try_claim
start, out = float(sys.argv[1]), Path(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
held = [n for n in range(40) if try_claim(out / f"v{n}")]
print(" ".join(map(str, held)), flush=True)
time.sleep(1.5)  # keep the claims alive while the others try
"""


def test_racing_processes_claim_each_folder_once(tmp_path):
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(start), str(tmp_path)], env=ENV,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    held = [set(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(len(h) for h in held) == 40 and set().union(*held) == set(range(40))


def test_clear_stale_removes_only_an_abandoned_claim(tmp_path):
    from lightning_ft.claims import clear_stale

    folder = tmp_path / "clip"
    held = try_claim(folder)
    assert not clear_stale(folder) and claim_path(folder).exists()  # a live owner's claim stays
    release(held)
    code = ("import os, signal, sys; from lightning_ft.claims import try_claim; try_claim(sys.argv[1]); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(folder)], env=ENV)
    assert claim_path(folder).exists() and clear_stale(folder) and not claim_path(folder).exists()
