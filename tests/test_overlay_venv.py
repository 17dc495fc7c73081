"""scripts/overlay_venv.sh, which scripts/test.sh uses for its torch 2.11 run. Started from inside
a virtual environment, the environment it makes sees that venv's packages and the modules of an
editable install there (a .pth file naming a source folder), where `python -m venv
--system-site-packages` would see the base interpreter's packages instead; its own packages come
first; a second run keeps it and its packages. No network: the venvs are made without pip."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "overlay_venv.sh"

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("bash") is None,
    reason="the scripts are bash with a POSIX venv layout",
)


def run(args, env=None, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


def site_packages(python: Path) -> Path:
    code = 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
    return Path(run([str(python), "-c", code]).stdout.strip())


def activated(venv: Path) -> dict:
    """The environment variables of a shell that ran `source venv/bin/activate`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def probe(python: Path, module: str, cwd: Path) -> str:
    code = f"import {module}; print({module}.WHERE)"
    return run([str(python), "-c", code], cwd=cwd).stdout.strip()


def test_overlay_of_a_venv_sees_its_packages_and_editable_installs(tmp_path):
    outer = tmp_path / "outer"
    run([sys.executable, "-m", "venv", "--without-pip", str(outer)])
    outer_site = site_packages(outer / "bin" / "python")
    # A package installed into the outer venv, and an editable install: a .pth naming a folder.
    (outer_site / "overlay_probe_installed.py").write_text('WHERE = "outer"\n')
    src = tmp_path / "src"
    src.mkdir()
    (src / "overlay_probe_editable.py").write_text('WHERE = "editable"\n')
    (outer_site / "overlay_probe_editable.pth").write_text(f"{src}\n")

    inner = tmp_path / "inner"
    env = activated(outer)
    run(["bash", str(SCRIPT), str(inner), "--without-pip"], env=env, cwd=tmp_path)
    inner_python = inner / "bin" / "python"
    assert probe(inner_python, "overlay_probe_installed", tmp_path) == "outer"
    assert probe(inner_python, "overlay_probe_editable", tmp_path) == "editable"

    # What is installed into the overlay itself shadows the outer venv's (torch 2.11 over the
    # newest torch in scripts/test.sh).
    inner_site = site_packages(inner_python)
    (inner_site / "overlay_probe_installed.py").write_text('WHERE = "inner"\n')
    assert probe(inner_python, "overlay_probe_installed", tmp_path) == "inner"
    code = "import sys; print('\\n'.join(sys.path))"
    lines = run([str(inner_python), "-c", code], cwd=tmp_path).stdout.splitlines()
    path = [Path(p) for p in lines if p]
    assert path.index(inner_site) < path.index(outer_site.resolve()) < path.index(src.resolve())

    # A second run keeps the overlay and its packages, and rewrites the .pth file.
    pth = inner_site / "_active_environment.pth"
    pth.write_text("\n")
    run(["bash", str(SCRIPT), str(inner), "--without-pip"], env=env, cwd=tmp_path)
    assert probe(inner_python, "overlay_probe_installed", tmp_path) == "inner"
    assert probe(inner_python, "overlay_probe_editable", tmp_path) == "editable"


def test_an_overlay_made_with_system_site_packages_is_made_afresh(tmp_path):
    outer = tmp_path / "outer"
    run([sys.executable, "-m", "venv", "--without-pip", str(outer)])
    (site_packages(outer / "bin" / "python") / "overlay_probe_installed.py").write_text(
        'WHERE = "outer"\n'
    )
    inner = tmp_path / "inner"
    # What earlier versions of scripts/test.sh made.
    run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(inner)])
    run(["bash", str(SCRIPT), str(inner), "--without-pip"], env=activated(outer), cwd=tmp_path)
    cfg = (inner / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    assert probe(inner / "bin" / "python", "overlay_probe_installed", tmp_path) == "outer"


def test_a_folder_that_is_not_a_venv_is_left_alone(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("keep\n")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT), str(target)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode != 0
    assert "is not a virtual environment" in done.stderr
    assert (target / "keep.txt").read_text() == "keep\n"
