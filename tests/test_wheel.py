"""The release wheel: built with maturin, installed into a fresh venv whose PATH has no Rust.

The wheel is built into a temporary folder, while cargo reuses ``target/``: on an unchanged tree
that only links and packs the extension again. It is installed with ``pip --no-index --no-deps``;
kvmkit's dependencies (``lz4``, ``zstandard``) are not downloaded but linked into the fresh venv
from the environment running the tests, so nothing here reaches the network. kvmkit is then
imported from outside the source tree, and runs a one-instruction guest where /dev/kvm exists.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPENDENCIES = ("lz4", "zstandard")
# The wheel's name: the stable ABI from Python 3.9 on, and a manylinux platform tag (maturin checks
# the glibc symbols the extension uses, as auditwheel does).
WHEEL_NAME = re.compile(
    r"kvmkit-(?P<version>[^-]+)-cp39-abi3-(?P<platform>manylinux_2_\d+_x86_64)[.\w]*\.whl"
)
# A guest that halts at once, and checks of the zero-copy view, from the installed package.
PROBE = """
import importlib.metadata, json, os, sys
import kvmkit, kvmkit._core
found = {
    "version": kvmkit.__version__,
    "distribution": importlib.metadata.version("kvmkit"),
    "package": kvmkit.__file__,
    "core": kvmkit._core.__file__,
}
if os.path.exists("/dev/kvm"):
    with kvmkit.VM(memory="2M") as vm:
        vm.mem_write(0, b"\\xf4")
        vm.vcpus[0].setup("real", 0)
        found["exit"] = vm.run(timeout=10).reason.value
        view = vm.mem_view(0x1000, 4)
        view[:] = b"kvm!"
        found["view"] = [view.format, view.readonly, vm.mem_read(0x1000, 4).decode()]
print(json.dumps(found))
"""

pytestmark = pytest.mark.watchdog(1200)  # a release build of the extension, on a busy machine


def cargo_version() -> str:
    """The version of the Rust workspace (Cargo.toml's [workspace.package]), kvmkit's only one."""
    text = (ROOT / "Cargo.toml").read_text()
    section = re.search(r"^\[workspace\.package\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert section is not None, "Cargo.toml has no [workspace.package]"
    version = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.MULTILINE)
    assert version is not None, "[workspace.package] has no version"
    return version.group(1)


def without_rust(path: str) -> str:
    """``path`` without the folders that hold cargo or rustc."""
    kept = [
        folder
        for folder in path.split(os.pathsep)
        if folder and not any(shutil.which(tool, path=folder) for tool in ("cargo", "rustc"))
    ]
    return os.pathsep.join(kept)


def link_distribution(name: str, site: Path) -> None:
    """Makes the installed distribution ``name`` importable from ``site`` by linking its
    top-level files and folders (packages, modules, .dist-info) there."""
    distribution = importlib.metadata.distribution(name)
    base = Path(str(distribution.locate_file("")))
    tops = {Path(str(file)).parts[0] for file in distribution.files or ()}
    for top in sorted(tops):
        source = base / top
        if top != ".." and source.exists() and not (site / top).exists():
            (site / top).symlink_to(source)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    maturin = shutil.which("maturin", path=str(Path(sys.executable).parent)) or shutil.which("maturin")
    if maturin is None:
        pytest.fail("maturin is not installed (scripts/bootstrap.sh installs it into .venv)")
    out = tmp_path_factory.mktemp("wheels")
    build = subprocess.run(
        [maturin, "build", "--release", "--interpreter", sys.executable, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, f"maturin build failed:\n{build.stderr[-4000:]}"
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), without_rust(os.environ.get("PATH", os.defpath))])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    for tool in ("cargo", "rustc"):
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} is still on the PATH"
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", str(wheels[0])]
    done = subprocess.run(pip, env=env, cwd=out, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for name in DEPENDENCIES:
        link_distribution(name, site)
    return Installed(wheels[0], venv, env)


def test_wheel_is_abi3_manylinux_with_license_and_urls(installed):
    match = WHEEL_NAME.fullmatch(installed.wheel.name)
    assert match, f"{installed.wheel.name} is not a cp39-abi3 manylinux wheel"
    assert match["version"] == cargo_version()
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        info = f"kvmkit-{match['version']}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        tags = wheel.read(f"{info}/WHEEL").decode()
        license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
    assert "kvmkit/_core.abi3.so" in names
    assert not [name for name in names if re.search(r"cpython-\d+", name)], names
    assert {"kvmkit/_core.pyi", "kvmkit/py.typed", "kvmkit/guests/agent.c"} <= set(names)
    assert f"Tag: cp39-abi3-{match['platform']}" in tags.splitlines()
    assert "Root-Is-Purelib: false" in tags.splitlines()
    fields = metadata.split("\n\n", 1)[0].splitlines()
    assert f"Version: {cargo_version()}" in fields
    assert "License-Expression: Apache-2.0" in fields
    assert "License-File: LICENSE" in fields
    assert "Requires-Python: >=3.9" in fields
    for label in ("Homepage", "Repository", "Documentation", "Issues"):
        url = f"Project-URL: {label}, https://github.com/kvmkit/kvmkit"
        assert any(line.startswith(url) for line in fields), f"no {label} URL"
    assert {f"Requires-Dist: {name}" for name in DEPENDENCIES} <= {line.split(">")[0] for line in fields}
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()


def probe(venv: Path, env: dict[str, str], cwd: Path) -> None:
    """Imports kvmkit in ``venv`` from ``cwd`` (outside the source tree) and runs a guest."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", PROBE],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["version"] == found["distribution"] == cargo_version()
    package = Path(found["package"])
    assert venv in package.parents, f"kvmkit was imported from {package}, not the fresh venv"
    assert ROOT not in package.parents
    assert Path(found["core"]).name == "_core.abi3.so"
    if os.path.exists("/dev/kvm"):
        assert found["exit"] == "hlt"
        assert found["view"] == ["B", False, "kvm!"]


def test_installed_wheel_imports_and_runs_without_the_source_tree(installed, tmp_path):
    probe(installed.venv, installed.env, tmp_path)
    check = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-m", "pip", "check"],
        env=installed.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def other_pythons() -> list[str]:
    """One interpreter of each other CPython 3.9+ that runs here: python3.N on the PATH, or one
    that pyenv installed (its shims run only the versions chosen for the folder)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = []
    for minor in range(9, 20):
        if minor == sys.version_info.minor:
            continue
        on_path = shutil.which(f"python3.{minor}")
        candidates = [on_path] if on_path else []
        candidates += [str(path) for path in sorted(pyenv.glob(f"3.{minor}.*/bin/python3.{minor}"))]
        for python in candidates:
            version = subprocess.run(
                [python, "-c", "import sys; print(sys.version_info[1])"], capture_output=True
            )
            if version.returncode == 0 and version.stdout.strip() == str(minor).encode():
                found.append(python)
                break
    return found


def test_the_one_wheel_serves_every_other_python_found(installed, tmp_path):
    """The same cp39-abi3 wheel on each other CPython 3.9+ found (the buffer export of mem_view
    included). Where there is none, only the interpreter of the test run is checked, above."""
    for python in other_pythons():
        venv = tmp_path / Path(python).name
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-deps"]
        done = subprocess.run([*pip, str(installed.wheel)], env=installed.env, capture_output=True, text=True)
        assert done.returncode == 0, f"{python}: {done.stdout}\n{done.stderr}"
        probe(venv, installed.env, tmp_path)
