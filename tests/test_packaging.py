"""The three ways to run thrum, install.sh, --version and the demo (SPEC §1, STYLE §1, §8)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, THRUM_PY, make_env

VERSION_RE = re.compile(r"\d+\.\d+")


def run(cmd, env, cwd, timeout=60):
    p = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def console_script() -> str | None:
    found = shutil.which("thrum")
    if found:
        return found
    beside = Path(sys.executable).parent / "thrum"
    return str(beside) if beside.exists() else None


@pytest.fixture
def penv(tmp_path):
    return make_env(tmp_path / "home")


def test_help_is_the_same_three_ways(penv, tmp_path):
    direct = run([sys.executable, THRUM_PY, "--help"], penv, tmp_path)
    assert direct.returncode == 0, direct.stderr
    assert "usage:" in direct.stdout.lower()
    for word in ("send", "inbox", "wait", "quickstart"):
        assert word in direct.stdout
    module = run([sys.executable, "-m", "thrum", "--help"], dict(penv, PYTHONPATH=str(REPO_ROOT)),
                 REPO_ROOT)
    assert module.returncode == 0, module.stderr
    assert module.stdout == direct.stdout
    script = console_script()
    if script is None:
        pytest.skip("no installed `thrum` console script (run through .ci/run)")
    installed = run([script, "--help"], penv, tmp_path)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout == direct.stdout


def test_version(penv, tmp_path):
    p = run([sys.executable, THRUM_PY, "--version"], penv, tmp_path)
    assert p.returncode == 0, p.stderr
    assert VERSION_RE.search(p.stdout), p.stdout
    assert len(p.stdout.strip().splitlines()) == 1
    m = run([sys.executable, "-m", "thrum", "--version"], dict(penv, PYTHONPATH=str(REPO_ROOT)),
            REPO_ROOT)
    assert m.returncode == 0 and VERSION_RE.search(m.stdout)


def test_install_sh_single_file(penv, tmp_path):
    home = tmp_path / "home"
    env = dict(penv, HOME=str(home), XDG_DATA_HOME=str(tmp_path / "data"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    bindir = tmp_path / "bin"
    p = run(["sh", REPO_ROOT / "install.sh", "--prefix", bindir], env, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    launcher = bindir / "thrum"
    assert launcher.is_file() and os.access(launcher, os.X_OK)
    installed = tmp_path / "data" / "thrum" / "thrum.py"
    assert installed.read_bytes() == Path(THRUM_PY).read_bytes()
    assert list((installed.parent / "__pycache__").glob("thrum.*.pyc")), "not precompiled"
    assert str(bindir) in p.stdout + p.stderr  # says where
    assert "PATH" in p.stdout + p.stderr  # bindir is not on PATH: warned
    v = run([launcher, "--version"], env, tmp_path)
    assert v.returncode == 0, v.stderr
    direct = run([sys.executable, THRUM_PY, "--version"], penv, tmp_path)
    assert v.stdout == direct.stdout
    # a second install is fine (upgrade in place)
    assert run(["sh", REPO_ROOT / "install.sh", "--prefix", bindir], env, tmp_path).returncode == 0
    # --prefix=DIR form and PREFIX env
    p = run(["sh", REPO_ROOT / "install.sh", f"--prefix={tmp_path / 'bin2'}"], env, tmp_path)
    assert p.returncode == 0 and (tmp_path / "bin2" / "thrum").is_file()
    p = run(["sh", REPO_ROOT / "install.sh"], dict(env, PREFIX=str(tmp_path / "bin3")), tmp_path)
    assert p.returncode == 0 and (tmp_path / "bin3" / "thrum").is_file()


def test_install_sh_help_and_bad_option(penv, tmp_path):
    p = run(["sh", REPO_ROOT / "install.sh", "--help"], penv, tmp_path)
    assert p.returncode == 0 and "--pip" in p.stdout and "--prefix" in p.stdout
    p = run(["sh", REPO_ROOT / "install.sh", "--bogus"], penv, tmp_path)
    assert p.returncode == 2 and "--bogus" in p.stderr
    assert not (Path(penv["HOME"]) / ".local" / "bin" / "thrum").exists()


def test_demo_cleans_up(penv, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(penv, TMPDIR=str(tmpdir))
    p = run([sys.executable, THRUM_PY, "demo"], env, cwd, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip()
    assert sorted(os.listdir(tmpdir)) == [], "demo left temp files behind"
    assert sorted(os.listdir(cwd)) == [], "demo wrote into the current directory"
