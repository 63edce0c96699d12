"""Packaging: the wheel ships the recipes of ``configs/`` as ``medseg/configs/`` and the installed CLI works.

The slow tests build a wheel from a copy of the checkout (a build inside the checkout would reuse a stale
``build/lib`` and could ship deleted modules), install it into a fresh venv with ``--no-deps`` and run it
from a folder outside the checkout. The venv sees this environment's third-party packages through a ``.pth``
file that names this environment's site-packages folder: such a folder is only appended to ``sys.path``
(its own ``.pth`` files are not processed), so an editable install of medseg here stays invisible there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Checkout folder → installed package: the CLI commands of pipelines/ install as medseg_cli (a top-level
#: "pipelines" could clash with another distribution's); benchmarks/ is not installed.
CODE_PACKAGES = {"medseg": "medseg", "pipelines": "medseg_cli"}
#: Top-level entries of the checkout that a build does not need (or must not see).
NOT_COPIED = {".venv", ".git", "build", "dist", "runs", "demo_out", ".pytest_cache", ".ruff_cache", "tests"}


def _code_packages(root: Path) -> set[str]:
    """Installed dotted names of the folders under medseg/ and pipelines/ that hold Python modules."""
    found = set()
    for top, installed in CODE_PACKAGES.items():
        for module in (root / top).rglob("*.py"):
            if "__pycache__" not in module.parts:
                found.add(".".join((installed, *module.parent.relative_to(root / top).parts)))
    return found


def test_pyproject_lists_every_package():
    """packages is a hand-written list (packages.find cannot map configs/ to medseg.configs)."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = _code_packages(REPO) | {"medseg.configs"}
    assert not on_disk - listed, (
        f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
    )
    assert not listed - on_disk, f"remove {sorted(listed - on_disk)} from [tool.setuptools] packages"
    assert setuptools_cfg["package-dir"] == {"medseg.configs": "configs", "medseg_cli": "pipelines"}


def _run(args: list, env: dict, cwd: Path, timeout: float = 120) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def _ignore_for_copy(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder) == REPO:
        skip |= NOT_COPIED & set(names)
    return skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from a copy of the checkout, installed into a fresh venv outside the checkout."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_ignore_for_copy, symlinks=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore")

    wheels = root / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*build, "-w", wheels, src], env, root)
    (wheel,) = wheels.glob("medseg-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env, root)
    python = venv / "bin" / "python"
    # Install before the venv can see this environment, so pip there finds no medseg to replace.
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        env,
        root,
    )
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, root).strip()
    )
    parents = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "_medseg_test_parent_env.pth").write_text("".join(f"{p}\n" for p in parents))

    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = root / "work"
    work.mkdir()
    return {"src": src, "wheel": wheel, "venv": venv, "python": python, "site": site, "env": env, "cwd": work}


@pytest.mark.slow
def test_wheel_ships_configs_and_only_current_modules(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    src = installed["src"]
    recipes = {
        f"medseg/configs/{p.relative_to(src / 'configs').as_posix()}"
        for p in (src / "configs").rglob("*.yaml")
    }
    assert {
        "medseg/configs/phantoms.yaml",
        "medseg/configs/variants/unet.yaml",
        "medseg/configs/oktay2018_pancreas.yaml",
    } <= recipes
    assert recipes <= names, f"recipes missing from the wheel: {sorted(recipes - names)}"
    modules = {
        f"{installed}/{p.relative_to(src / top).as_posix()}"
        for top, installed in CODE_PACKAGES.items()
        for p in (src / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    shipped = {n for n in names if n.endswith(".py")}
    assert shipped == modules, f"missing: {sorted(modules - shipped)}; extra: {sorted(shipped - modules)}"
    assert not any(n.startswith("configs/") for n in names)
    # only medseg's own top-level names: no "pipelines", no benchmark scripts
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "medseg",
        "medseg_cli",
    }
    assert not any("bench" in n for n in names)
    for recipe in ("phantoms.yaml", "variants/unet.yaml"):
        assert (installed["site"] / "medseg" / "configs" / recipe).is_file()


@pytest.mark.slow
def test_installed_cli_help(installed):
    medseg = installed["venv"] / "bin" / "medseg"
    out = _run([medseg, "--help"], installed["env"], installed["cwd"])
    assert "train" in out and "demo" in out
    assert "--out" in _run([medseg, "demo", "--help"], installed["env"], installed["cwd"])


@pytest.mark.slow
def test_installed_recipe_path_is_inside_the_venv(installed):
    code = (
        "import medseg; from medseg.config import recipe_path; "
        "print(medseg.__file__); print(recipe_path('variants/unet')); print(recipe_path('phantoms'))"
    )
    lines = _run([installed["python"], "-c", code], installed["env"], installed["cwd"]).split()
    site = installed["site"].resolve()
    for line in lines:
        path = Path(line).resolve()
        assert path.is_relative_to(site), f"{path} is not inside the venv's {site}"
        assert not path.is_relative_to(REPO)
    assert lines[1:] == [
        str(site / "medseg" / "configs" / "variants" / "unet.yaml"),
        str(site / "medseg" / "configs" / "phantoms.yaml"),
    ]


@pytest.mark.slow
def test_installed_cli_trains_from_a_shipped_recipe(installed):
    env, cwd, medseg = installed["env"], installed["cwd"], installed["venv"] / "bin" / "medseg"
    code = "from medseg.config import recipe_path, load_config; p = recipe_path('variants/unet'); load_config(p); print(p)"
    recipe = Path(_run([installed["python"], "-c", code], env, cwd).strip())
    assert recipe.resolve().is_relative_to(installed["site"].resolve())

    data, run = cwd / "data", cwd / "run"
    _run([medseg, "phantoms", data, "--cases", "3", "--test", "1", "--shape", "32", "32", "16"], env, cwd)
    overrides = [
        f"data.root={data}",
        f"train.output={run}",
        "model.filters=[4,8,16,32]",
        "augment.patch_size=[32,32,16]",
        "augment.samples_per_volume=1",
        "train.epochs=1",
        "train.iters_per_epoch=1",
        "train.batch_size=1",
        "train.progress=false",
        "data.val_fraction=0.34",
    ]
    _run([medseg, "train", recipe, *(a for o in overrides for a in ("--set", o))], env, cwd, timeout=300)
    assert (run / "best.pt").is_file()


@pytest.mark.slow
def test_installed_api_creates_a_network(installed):
    """The issue's acceptance line, in the fresh venv from the wheel."""
    code = (
        "import sys, medseg; assert 'torch' not in sys.modules; "
        "net = medseg.create_network('attention_unet', 1, 3); print(type(net).__name__, len(medseg.list_networks()))"
    )
    name, count = _run([installed["python"], "-c", code], installed["env"], installed["cwd"]).split()
    assert name == "AttentionUNet3D" and int(count) >= 2
