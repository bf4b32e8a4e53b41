"""Comfy Registry readiness: the pyproject.toml fields `comfy node validate` / `comfy node publish` read, and
the security check `comfy node validate` runs (comfy-cli 1.23: `ruff check . --select S102,S307,E702`, i.e.
no exec, no eval, no two statements on one line)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_pyproject_has_what_the_registry_needs():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert isinstance(project["license"], dict) and set(project["license"]) & {"file", "text"}
    assert project["description"] and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "SafeDIG"
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    os_classifiers = [c for c in project.get("classifiers", []) if c.startswith("Operating System :: ")]
    assert os_classifiers == ["Operating System :: OS Independent"]
    # The registry installs [project].dependencies: they must be the runtime requirements.
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert project["dependencies"] == reqs


def test_no_exec_eval_or_one_line_statement_chains():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "-q", "--select", "S102,S307,E702",
                           "--exit-zero"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout
