"""The package as users install it, and the container recipes that install it.

A wheel built from a copy of the checkout holds the library, data_prep, the presets, the DeepSpeed
JSONs, one console script per runnable module and requirements.txt's exact pins -- and nothing of
bench/ or tests/. Installed (--no-deps) into a fresh venv that borrows this venv's packages, it
works from a folder outside the repository: presets resolve relative to the package, not the
working directory. No downloads: pip builds without isolation and installs from the wheel file.
"""

from __future__ import annotations

import configparser
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import dalle_ds.cli
from dalle_ds.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "__pycache__", "*.pyc",
                                     "*.egg-info", ".pytest_cache")


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path_factory.mktemp("src") / "dalle-ds"
    shutil.copytree(ROOT, src, symlinks=True, ignore=COPY_IGNORE)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-w", str(out), str(src)], check=True, timeout=120)
    (whl,) = out.glob("dalle_ds-*.whl")
    return whl


def _dist_info(whl: Path, name: str) -> str:
    with zipfile.ZipFile(whl) as z:
        (path,) = [n for n in z.namelist() if re.fullmatch(rf"dalle_ds-[^/]+\.dist-info/{name}", n)]
        return z.read(path).decode()


def test_wheel_holds_the_code_presets_and_deepspeed_jsons_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"dalle_ds", "data_prep"}, tops  # no bench/, tests/, slurm/
    for pattern in ("dalle_ds/configs/*.yaml", "dalle_ds/ds_configs/*.json", "dalle_ds/**/*.py", "data_prep/*.py"):
        expected = {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern)}
        assert expected and expected <= names, sorted(expected - names)
    # the repository's ds_configs/ is the packaged folder under its documented name
    assert (ROOT / "ds_configs").resolve() == (ROOT / "dalle_ds" / "ds_configs").resolve()


def test_wheel_requires_exactly_the_pins_of_requirements_txt(wheel):
    meta = email.parser.Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert meta["Version"] == dalle_ds.__version__
    required = [str(Requirement(r)) for r in meta.get_all("Requires-Dist")]
    pinned = _requirements(ROOT / "requirements.txt")
    assert required == [str(r) for r in pinned]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pinned), pinned
    assert "torch==2.13.0" in required  # a CUDA build (2.13.0+cu126) satisfies it and is kept


def test_console_scripts_cover_every_runnable_module(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    scripts = dict(entry_points["console_scripts"])
    assert scripts == {cmd: f"dalle_ds.cli:{cmd.removeprefix('dalle-').replace('-', '_')}"
                       for cmd in dalle_ds.cli.COMMANDS}
    runnable = {f"{p.parent.name}.{p.stem}" for folder in ("dalle_ds", "data_prep")
                for p in (ROOT / folder).glob("*.py") if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert set(dalle_ds.cli.COMMANDS.values()) == runnable


def test_installed_wheel_works_outside_the_repository(wheel, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    # `venv --system-site-packages` would expose the base interpreter's packages, not this venv's:
    # a .pth line appends this venv's site-packages after the new venv's own (its .pth files stay unread).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=120)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "zz_test_venv.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = """
import json, sys
from importlib.resources import files
from dalle_ds import Pipeline
from dalle_ds.config import load_config
import dalle_ds, data_prep.shard_corpus
print(json.dumps({"package": dalle_ds.__file__, "data_prep": data_prep.shard_corpus.__file__,
                  "tiny": load_config("tiny").to_dict(),
                  "jsons": sorted(p.name for p in (files("dalle_ds") / "ds_configs").iterdir()),
                  "bench": sorted(m for m in sys.modules if m == "bench" or m.startswith("bench."))}))
"""
    res = subprocess.run([python, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(site) and got["data_prep"].startswith(site), (got, site)  # not the checkout
    assert got["tiny"] == load_config("tiny").to_dict()
    assert got["jsons"] == sorted(p.name for p in (ROOT / "dalle_ds" / "ds_configs").glob("*.json"))
    assert got["bench"] == []  # the library imports nothing from bench/
    # a console script runs its module from the same folder
    res = subprocess.run([venv / "bin" / "dalle-plan", "--help"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- container recipes (not built here)

@pytest.mark.parametrize("recipe", ["docker/Dockerfile", "docker/dalle-ds.def"])
def test_container_recipe_pins_the_same_torch_and_constraints(recipe):
    text = (ROOT / recipe).read_text()
    (torch,) = [r for r in _requirements(ROOT / "requirements.txt") if r.name == "torch"]
    assert f"torch{torch.specifier}" in text  # the same torch as requirements.txt
    assert "https://download.pytorch.org/whl/cu126" in text  # CUDA 12.6: the newest torch build with Volta
    assert re.search(r"nvidia/cuda:12\.6\.\d+-", text)  # CUDA 12.6 base image
    assert re.search(r"pip install[^\n]*-c constraints\.txt", text)
    assert "DS_BUILD_OPS=0" in text
    assert "cu128" not in text
