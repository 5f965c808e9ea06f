"""``python -m benchmarks.wheel_check .whl``: do the carried wheels' requirements hold on the GPU image?

The wheels are installed there with ``--no-deps`` beside the image's own packages, so pip checks
nothing. This reads every wheel's ``Requires-Dist`` (markers evaluated for the image's Python 3.12
on Linux x86-64, extras ignored) and checks each against another carried wheel or against the
image's packages. Exit status 1 if a requirement is missing or a known version falls outside
its range; a package the image has at an unrecorded version is listed for the environment
report of ``benchmarks/gpu.sh`` to confirm there: gpu.sh runs this with ``--installed`` after its
install step, checking every requirement against the versions actually importable there. Needs only
``packaging``; no network.
"""

import argparse
import sys
from importlib import metadata
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# The GPU image ('cuda'), as its pip list was read there in 2026-11: versions where they were read, None
# where only the package's presence was.
IMAGE_VERSIONS = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2",
}
IMAGE_PRESENT = ("aiohttp", "filelock", "fsspec", "httpx", "jinja2", "packaging", "pandas", "psutil", "pyarrow",
                 "pyyaml", "requests", "tqdm", "xxhash", "typing-extensions", "regex", "einops")
ENVIRONMENT = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
                   platform_system="Linux", platform_machine="x86_64", os_name="posix",
                   implementation_name="cpython", platform_python_implementation="CPython", extra="")


def wheel_requirements(path: Path):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(ENVIRONMENT):
            yield requirement


def _installed(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check(folder: Path, installed: bool = False) -> int:
    """Print each wheel's requirements with where they are met; 1 if one is not. ``installed``: check
    against this Python's packages (run on the GPU machine by gpu.sh), else against IMAGE_VERSIONS."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {folder}")
        return 1
    carried = {}
    for path in wheels:
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in carried:
            print(f"ERROR: two versions of {name}: pip would stop the whole install")
            return 1
        carried[name] = version
    known = {canonicalize_name(k): v for k, v in IMAGE_VERSIONS.items()}
    present = {canonicalize_name(k) for k in IMAGE_PRESENT}
    problems = unconfirmed = 0
    for path in wheels:
        print(f"{path.name}")
        for req in wheel_requirements(path):
            name = canonicalize_name(req.name)
            if installed:
                version = _installed(name)
                ok = version is not None and req.specifier.contains(version, prereleases=True)
                where = f"installed {version}" if version else "NOT INSTALLED"
            elif name in carried:
                ok = req.specifier.contains(carried[name], prereleases=True)
                where = f"carried {carried[name]}"
            elif known.get(name):
                ok = req.specifier.contains(known[name], prereleases=True)
                where = f"image {known[name]}"
            elif name in present:
                ok, where = None, "image, version not recorded: see gpu.sh's environment report"
            else:
                ok, where = False, "MISSING from the image and the wheels"
            status = {True: "ok", False: "FAIL", None: "check"}[ok]
            problems += ok is False
            unconfirmed += ok is None
            print(f"  {status:5s} {req}  ({where})")
    print(f"{len(wheels)} wheels: {problems} unmet requirement(s), {unconfirmed} to confirm on the machine")
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wheel_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=Path(".whl"))
    parser.add_argument("--installed", action="store_true",
                        help="check against the packages this Python imports (on the GPU machine, after the install)")
    args = parser.parse_args(argv)
    return check(args.folder, args.installed)


if __name__ == "__main__":
    sys.exit(main())
