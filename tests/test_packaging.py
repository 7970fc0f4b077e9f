"""apps/ installs as densevit.apps (never as a bare top-level `apps`), editable and regular installs alike."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import densevit.apps

import densevit

ROOT = Path(densevit.__file__).resolve().parent.parent


def test_this_install_imports_densevit_apps():
    apps_dir = Path(densevit.apps.__file__).resolve().parent
    # editable install: mapped onto the repository's apps/; regular install: densevit/apps inside site-packages
    assert apps_dir == ROOT / "apps" or apps_dir == Path(densevit.__file__).resolve().parent / "apps"


def test_regular_install_from_wheel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("densevit", "apps"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("densevit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "densevit/apps/__init__.py" in names
    assert "densevit/apps/explore/static/index.html" in names  # the explorer's page ships with the package
    assert "densevit/py.typed" in names                          # type hints are shipped (PEP 561)
    assert "densevit/compat/dvf.py" in names
    assert not any(n.startswith("apps/") for n in names)
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    code = "import densevit, densevit.apps; print(densevit.apps.__file__); import importlib.util as u; " \
           "print(u.find_spec('apps'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": ""}, check=True).stdout.split("\n")
    assert Path(out[0]).resolve().is_relative_to(site.resolve() / "densevit" / "apps")
    assert (site / "densevit" / "py.typed").is_file()
    assert out[1] == "None"  # no bare `apps` importable from the install
