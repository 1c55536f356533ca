"""`pip install "idselect[gpu]"` resolves beside every supported vLLM release, and the engine's
own pins (torch, torchvision, transformers) are the ones that release asks for.

pip resolves the checkout's `.[gpu]` with `vllm==X` against the package registry, as a user's
pip would (`--dry-run --ignore-installed --report`), for the three releases at once. Needs the
registry (CI has it).

One stand-in: vLLM 0.34.0 pins flashinfer-python==0.7.3, which this machine's registry does not
hold (0.7.2.post1 and 0.7.4 are there), so no pip here can install vLLM 0.34.0 with or without
idselect. A metadata-only wheel of that name and version stands in for it, so pip resolves
everything else; the test checks first that the registry still lacks it (and fails, asking for
the stand-in to go, once it does not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from devtools.vllm_releases import ROOT
from idselect.vllm_plugin.compat import SUPPORTED_RANGE

pytestmark = pytest.mark.releases

RELEASES = ("0.32.0", "0.33.0", "0.34.0")
# What each release pins (from its wheel's metadata), which pip must pick.
ENGINE_PINS = {
    "0.32.0": {"torch": "2.13.0", "torchvision": "0.28.0"},
    "0.33.0": {"torch": "2.14.0", "torchvision": "0.29.0"},
    "0.34.0": {"torch": "2.14.0", "torchvision": "0.29.0"},
}
MISSING_FROM_REGISTRY = {"0.34.0": ("flashinfer-python", "0.7.3")}
_ENV = {**os.environ, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""}


def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args],
        capture_output=True, text=True, env=_ENV, timeout=timeout, cwd=ROOT,
    )


def _stand_in_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel holding only metadata: pip can resolve it, nothing can import it."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{dist}.dist-info/METADATA",
                     f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                     "Summary: idselect test stand-in (metadata only)\n")
        whl.writestr(f"{dist}.dist-info/WHEEL",
                     "Wheel-Version: 1.0\nGenerator: idselect\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def _resolve(release: str, folder: Path) -> dict:
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--only-binary", ":all:",
            "--report", str(folder / "report.json")]
    if release in MISSING_FROM_REGISTRY:
        _stand_in_wheel(folder, *MISSING_FROM_REGISTRY[release])
        args += ["--find-links", str(folder)]
    done = _pip(*args, ".[gpu]", f"vllm=={release}")
    assert done.returncode == 0, f"vLLM {release}: {done.stderr[-3000:]}"
    report = json.loads((folder / "report.json").read_text())
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]
            for item in report["install"]}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    folders = {r: tmp_path_factory.mktemp(f"resolve-{r}") for r in RELEASES}
    with ThreadPoolExecutor(len(RELEASES)) as pool:
        futures = {r: pool.submit(_resolve, r, folders[r]) for r in RELEASES}
        return {r: f.result() for r, f in futures.items()}


def test_the_stand_ins_are_still_needed():
    for name, version in MISSING_FROM_REGISTRY.values():
        done = _pip("download", "--no-deps", "--only-binary", ":all:", "--dest", os.devnull,
                    f"{name}=={version}", timeout=120)
        assert done.returncode != 0, f"the registry now has {name}=={version}: drop its stand-in"
        assert "No matching distribution" in done.stderr


@pytest.mark.parametrize("release", RELEASES)
def test_gpu_extra_resolves_beside_the_release(resolved, release):
    installed = resolved[release]
    assert installed["vllm"]["version"] == release
    assert installed["idselect"]["version"]
    for package, version in ENGINE_PINS[release].items():
        assert installed[package]["version"] == version, package
    # Every requirement of idselect's, and of the gpu extra, holds in what pip picked.
    for line in installed["idselect"].get("requires_dist", []):
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"extra": "gpu"}):
            continue
        have = installed[canonicalize_name(requirement.name)]["version"]
        assert requirement.specifier.contains(Version(have), prereleases=True), (line, have)


def test_the_gpu_extra_admits_exactly_the_supported_releases():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (vllm,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    assert str(vllm.specifier) == str(Requirement(f"vllm{SUPPORTED_RANGE}").specifier)
    for release in RELEASES:
        assert vllm.specifier.contains(release)
    assert not vllm.specifier.contains("0.35.0") and not vllm.specifier.contains("0.31.9")
