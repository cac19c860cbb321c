"""The `zoetrope` command: help works, bad options and values fail in one line, not a traceback."""

import os
import subprocess
import sys

import pytest

from tests.conftest import make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("cli"))


def zoetrope(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("ZOETROPE_PROJECT", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["run"], ["generate"], ["serve"]])
def test_help(project, command):
    proc = zoetrope(*command, "--help", cwd=project)
    assert proc.returncode == 0 and "usage: zoetrope" in proc.stdout


@pytest.mark.parametrize("args, reason", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run", "--set", "dit.nope=1"], "unknown key dit.nope"),
    (["run", "--set", "dit.steps=many"], "dit.steps='many' should be int"),
    (["run", "--profile", "huge"], "unknown profile 'huge'"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "a red circle", "--out", "v.mp4", "--seed", "-3"], "argument --seed: -3 must be in"),
    (["generate", "a red circle", "--out", "v.txt"], "use a file name ending in .mp4 or .gif"),
    (["serve", "--port", "zero"], "argument --port: 'zero' is not an integer"),
])
def test_bad_input_fails_in_one_line(project, args, reason):
    proc = zoetrope(*args, cwd=project)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert reason in lines[0] and "Traceback" not in proc.stderr


def test_generate_without_a_champion_says_how_to_get_one(project):
    proc = zoetrope("generate", "a red circle", "--out", "v.mp4", cwd=project)
    assert proc.returncode != 0
    assert "no 'champion' alias" in proc.stderr and "Traceback" not in proc.stderr


def test_outside_a_project_names_the_fix(tmp_path):
    proc = zoetrope("run", cwd=tmp_path)
    assert proc.returncode != 0 and "no Zoetrope project" in proc.stderr
