"""Which of requirements.txt's packages the current Python environment lacks: what `./run_all.sh --no-venv` installs
(on Kaggle or Colab torch and most of the rest are there already, and a 6 GB venv is unwelcome).

    python -m utils.requirements requirements.txt [--install]

A requirement is met when an installed distribution of that name has a version its specifier allows. torch and
torchvision are never installed, upgraded or downgraded here, whatever their version: they come with the platform's
CUDA build, and replacing them breaks it. So the missing packages are installed with the installed torch and
torchvision pinned (a pip constraints file): a package that would need another torch fails to install rather than
replace it. Without torch or torchvision there is nothing to pin: that is an error naming the fix. Nothing is
written into the checkout.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

NEVER_INSTALLED = ("torch", "torchvision")


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check(lines: Iterable[str], installed: Callable[[str], str | None] = _installed_version
          ) -> tuple[list[str], list[str]]:
    """(requirements to install, notes on the platform's own packages that do not match) for requirement lines."""
    to_install, notes = [], []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installed(requirement.name)
        met = version is not None and requirement.specifier.contains(version, prereleases=True)
        if met:
            continue
        if requirement.name.lower() in NEVER_INSTALLED:
            notes.append(f"{requirement.name} {version or 'is not installed'}: the project asks for {text}; "
                         f"install the platform's {requirement.name} build yourself (never done here)")
        else:
            to_install.append(text)
    return to_install, notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.requirements", description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements", help="requirements.txt")
    parser.add_argument("--install", action="store_true", help="pip-install what is missing into this environment")
    args = parser.parse_args(argv)
    to_install, notes = check(Path(args.requirements).read_text().splitlines())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not to_install:
        print("the current environment has every requirement")
        return 0
    print(f"missing from the current environment: {' '.join(to_install)}")
    if not args.install:
        return 0
    pins = {name: _installed_version(name) for name in NEVER_INSTALLED}
    missing = [name for name, version in pins.items() if version is None]
    if missing:  # timm needs torchvision: pip would fetch a build that may not match the platform's torch
        print(f"error: {' and '.join(missing)} not installed here: install the platform's torch and torchvision "
              "builds first (https://pytorch.org/get-started/locally/), or use ./run_all.sh without --no-venv",
              file=sys.stderr)
        return 1
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="percovid_constraints_") as constraints:
        constraints.write("".join(f"{name}=={version}\n" for name, version in pins.items() if version))
        constraints.flush()
        return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "-c", constraints.name,
                                *to_install])


if __name__ == "__main__":
    sys.exit(main())
