"""Assemble an arm64 userland for `make test-arm64`: Debian's Python for arm64 and the
package's locked wheels for it, enough to run the server and the Go tests under qemu-user.

    python3 tests/arm64/make_root.py ROOT

ROOT gets Debian trixie's arm64 python3.13 (with its headers, for the native modules) from
deb.debian.org, each .deb checked against the suite's Packages index, and under ROOT/site the
manylinux aarch64 wheels of the versions uv.lock pins. Trixie, not the bookworm this machine
runs, because the lock's numpy needs Python >= 3.12 and bookworm has 3.11; trixie has no 3.12,
so the arm64 run is on 3.13 (the package's code runs unchanged on it). Nothing is installed
on the host; a finished ROOT (ROOT/.complete) is left as it is. Needs qemu-aarch64, to
byte-compile the root with its own interpreter.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
PYTHON = "3.13"
# What python3.13 needs to start and to import what the server imports, without resolving
# Depends: an explicit list keeps the root small and the download fixed.
DEBS = [
    "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8", "libssl3t64",
    "libbz2-1.0", "liblzma5", "libzstd1", "libmpdec4", "libuuid1",
    f"python{PYTHON}-minimal", f"libpython{PYTHON}-minimal", f"libpython{PYTHON}-stdlib",
    f"libpython{PYTHON}-dev",
]
WHEELS = ["numpy", "ml-dtypes", "posix-ipc", "prometheus-client"]
REPO = Path(__file__).resolve().parents[2]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def packages_index(cache: Path) -> dict[str, dict[str, str]]:
    path = cache / f"Packages-{SUITE}-arm64"
    if not path.exists():
        path.write_bytes(lzma.decompress(fetch(f"{MIRROR}/dists/{SUITE}/main/binary-arm64/Packages.xz")))
    index: dict[str, dict[str, str]] = {}
    for stanza in path.read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            index[fields["Package"]] = fields
    return index


def locked_version(name: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    versions = {p["version"] for p in lock["package"] if p["name"] == name}
    if len(versions) != 1:
        raise SystemExit(f"make_root: uv.lock pins {sorted(versions) or 'no version'} of {name}")
    return versions.pop()


def main() -> int:
    root = Path(sys.argv[1]).resolve()
    if (root / ".complete").exists():
        return 0
    shutil.rmtree(root, ignore_errors=True)
    cache = root.parent / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    index = packages_index(cache)
    for name in DEBS:
        if name not in index:
            raise SystemExit(f"make_root: {SUITE}/arm64 has no package {name}")
        fields = index[name]
        deb = cache / Path(fields["Filename"]).name
        if not deb.exists():
            data = fetch(f"{MIRROR}/{fields['Filename']}")
            if hashlib.sha256(data).hexdigest() != fields["SHA256"]:
                raise SystemExit(f"make_root: {deb.name} does not match the {SUITE} index")
            deb.write_bytes(data)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for top in ("lib", "bin"):  # trixie's merged /usr: base-files would make these links
        (root / top).symlink_to(f"usr/{top}")
    (root / "python").symlink_to(f"usr/bin/python{PYTHON}")  # what the Makefile runs
    site = root / "site"
    site.mkdir()
    tag = PYTHON.replace(".", "")
    for name in WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", PYTHON, "--implementation",
                        "cp", "--platform", "manylinux_2_28_aarch64", "--platform",
                        "manylinux_2_27_aarch64", "--platform", "manylinux2014_aarch64",
                        "--platform", "any", "-d", str(cache),
                        f"{name}=={locked_version(name)}"], check=True)
        stem = f"{name.replace('-', '_')}-{locked_version(name)}-"
        wheel = next(w for w in cache.glob(f"{stem}*.whl")
                     if f"cp{tag}" in w.name or "py3-none-any" in w.name)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    # Debian byte-compiles the stdlib at install time, which extracting skips, and under
    # emulation compiling numpy and the stdlib at every start takes a minute: do it once.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(["qemu-aarch64", str(root / "usr/bin" / f"python{PYTHON}"), "-m", "compileall",
                    "-q", "-x", "/(test|tests|idlelib|tkinter|turtledemo)/",
                    str(root / "usr/lib" / f"python{PYTHON}"), str(site)],
                   env=env | {"QEMU_LD_PREFIX": str(root), "PYTHONHOME": str(root / "usr")},
                   check=True, stdout=subprocess.DEVNULL)
    (root / ".complete").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
