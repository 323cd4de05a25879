"""The package as users install it: the package list matches the tree, the CLI imports no torch, and a regular
(non-editable) wheel install carries the app in app/ as saelab.app and serves it."""

import os
import pathlib
import shutil
import subprocess
import sys
import urllib.request

import pytest
import tomllib

from tests.appserver import serving

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree_packages() -> set[str]:
    """Every folder with an __init__.py under saelab/ (as saelab.…) and app/ (as saelab.app.…)."""
    found = set()
    for top, name in (("saelab", "saelab"), ("app", "saelab.app")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = _tree_packages()
    assert tree - listed == set(), f"packages missing from pyproject.toml [tool.setuptools] packages: {tree - listed}"
    assert listed - tree == set(), f"pyproject.toml lists packages that do not exist: {listed - tree}"


def test_cli_and_package_import_without_torch():
    """`saelab --help` and `import saelab` stay light: the CLI imports the library where a command runs."""
    code = ("import sys, saelab, saelab.cli; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'numpy', 'h5py', 'transformer_lens')]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """saelab built as a wheel (offline, this venv's setuptools) and installed into a folder of its own. The wheel
    is built from a copy of the sources: a build/ folder in the checkout may hold stale modules setuptools would
    package."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "site", "activations", "runs",
                                                             "*.egg-info", "__pycache__", "benchmarks", "docs"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, timeout=600, cwd=tmp)
    wheel = next((tmp / "dist").glob("saelab-*.whl"))
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   timeout=600, cwd=tmp)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return tmp, site, env


def test_wheel_holds_the_app_and_its_pages(installed):
    tmp, site, env = installed
    code = ("import saelab, saelab.app, pathlib; print(saelab.__file__); print(saelab.app.HOME); "
            "print(sorted(p.name for p in (saelab.app.HOME.parent / 'pages').glob('*.py')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp, timeout=120)
    assert r.returncode == 0, r.stderr
    pkg, home, pages = r.stdout.strip().splitlines()
    assert pathlib.Path(pkg).is_relative_to(site) and pathlib.Path(home) == site / "saelab" / "app" / "Home.py"
    assert pages == str(sorted(p.name for p in (ROOT / "app" / "pages").glob("*.py")))
    assert (site / "saelab" / "tiny" / "model.safetensors").is_file()  # the bundled model travels with it


def test_wheel_install_serves_the_app(installed, demo_group):
    """`saelab app` from the regular install: the server comes up on the installed Home.py and renders it."""
    tmp, site, env = installed
    with serving(demo_group.group, env=env, cwd=tmp) as (url, server):
        assert b"<title>" in urllib.request.urlopen(url, timeout=10).read()
    # the installed pages render (AppTest runs the installed Home.py on the demo group)
    code = ("import os, sys; from streamlit.testing.v1 import AppTest; import saelab.app as a; "
            f"os.environ['SAELAB_APP_SAE'] = {str(demo_group.group)!r}; "
            "at = AppTest.from_file(str(a.HOME), default_timeout=120).run(); "
            "assert not at.exception, at.exception; print([t.value for t in at.title])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0 and "saelab" in r.stdout, r.stdout + r.stderr
