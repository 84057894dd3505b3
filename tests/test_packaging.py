"""A non-editable install (what `pip install solopo-mcore` gives) finds the named recipes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_ships_named_recipes(tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("solopo_mcore", "data_tools"):  # a copy: pip builds in the source tree
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    probe = ("import solopo_mcore, solopo_mcore.config as c; "
             "print(solopo_mcore.__file__); "
             "names = sorted(p.stem for p in c.RECIPES_DIR.glob('*.yaml')); print(names); "
             "[c.resolve_recipe(n) for n in names]")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-3000:]
    first, names = out.stdout.splitlines()[:2]
    assert first.startswith(str(target)), first  # the installed copy, not this checkout
    expected = sorted(p.stem for p in (REPO / "solopo_mcore" / "recipes").glob("*.yaml"))
    assert names == str(expected) and "tiny_cpu" in names
