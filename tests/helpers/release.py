"""The previous release, taken from git history: the newest ``release:`` commit that
CHANGELOG.md names, extracted with ``git archive`` (no tag needed) and run pure-Python
(``TUNNEL_PURE_PYTHON=1``: nothing to build) with only its own directory on Python's path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers.processes import PY, ROOT, _env

RELEASE = re.compile(r"^## (\S+) .*?\n+release: ([0-9a-f]{40})$", re.MULTILINE)


def previous_release() -> tuple[str, str]:
    """``(version, commit)`` of the newest release named in CHANGELOG.md."""
    found = RELEASE.findall((ROOT / "CHANGELOG.md").read_text())
    assert found, "CHANGELOG.md names no release commit ('release: <40 hex digits>' under a version heading)"
    return found[0]


def old_prefix(tree: Path) -> list[str]:
    """Runs a command with only the old tree on Python's path (not the working directory)."""
    return ["env", f"PYTHONPATH={tree}", "PYTHONSAFEPATH=1", "TUNNEL_PURE_PYTHON=1"]


def extract_previous_release(dest: Path) -> tuple[str, Path]:
    """``(version, tree)``: the previous release's files in ``dest``, checked to load alone."""
    version, commit = previous_release()
    git = ["git", "-C", str(ROOT)]
    try:
        present = subprocess.run([*git, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True).returncode == 0
    except FileNotFoundError:
        raise AssertionError("git is missing: the previous release is taken from git history") from None
    if not present:
        shallow = subprocess.run([*git, "rev-parse", "--is-shallow-repository"], capture_output=True, text=True)
        assert shallow.stdout.strip() != "true", (
            f"release {version} ({commit}) is not in this shallow clone: clone with its history")
        raise AssertionError(f"release {version}'s commit {commit} is not in this repository's history")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run([*git, "archive", "--format=tar", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # Only the old tree's packages load, even run from this checkout.
    where = subprocess.run([*old_prefix(dest), PY, "-c", "import agent, relay, tunnel; "
                            "print(agent.__file__, relay.__file__, tunnel.__file__, tunnel.__version__)"],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), check=True).stdout.split()
    assert all(path.startswith(str(dest)) for path in where[:3]) and where[3] == version, where
    return version, dest
