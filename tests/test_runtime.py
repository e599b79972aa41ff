"""Thread settings are the entry points' business: importing the library leaves the environment alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The third-party libraries are imported first: what they do to the environment
# on import (OpenCV sets Qt's plugin path) is theirs, not the tracker's.
_ENV_AFTER = """
import json, os, sys
import av, cv2, numpy, torch
before = dict(os.environ)
{imports}
after = dict(os.environ)
print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))
"""


def _changed_variables(imports: str) -> list:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OPENCV_FOR_THREADS_NUM", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _ENV_AFTER.format(imports=imports)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_library_changes_no_environment_variable():
    imports = "\n".join(f"import lightning_ft.{m}" for m in
                        ("pipeline", "batch", "cli", "workers", "landmarks", "render", "export", "synthesis", "report"))
    assert _changed_variables(imports) == []


def test_the_cli_entry_sets_the_thread_defaults():
    changed = _changed_variables("from lightning_ft.cli import main\n"
                                 "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n")
    assert changed == ["GOMP_SPINCOUNT", "OPENCV_FOR_THREADS_NUM"]


def test_the_cli_module_loads_no_torch_before_its_entry_runs():
    # torch reads GOMP_SPINCOUNT when it starts: the entry must run first
    out = subprocess.run([sys.executable, "-c", "import sys, lightning_ft.cli, lightning_ft.runtime; "
                          "print(sorted(m for m in ('torch', 'cv2', 'av') if m in sys.modules))"],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_a_users_wait_policy_wins(monkeypatch):
    from lightning_ft.runtime import configure_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OPENCV_FOR_THREADS_NUM", "3")
    configure_threads()
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OPENCV_FOR_THREADS_NUM"] == "3"
