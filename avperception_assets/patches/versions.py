"""The version check every patch makes before it applies.

A patch is written against exact versions of the libraries it mends (pinned in
pyproject.toml). On any other version it does not apply:

- a patch the code is still correct without (`correctness=False`: the import deferrals, a
  silenced log line) is skipped, with one warning per process saying what that costs;
- a patch the code is correct only with (`correctness=True`) refuses: `PatchVersionError`
  names the patch and both versions, so the process fails at start-up instead of running wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

_reported: set[str] = set()  # skipped patches already logged in this process


class PatchVersionError(RuntimeError):
    """A correctness patch met a library version it was not written for."""


def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "none"


@dataclass(frozen=True)
class Patch:
    name: str  # `<library>.<what it mends>`: the module under patches/ and the patch in it
    written_for: dict[str, str]  # distribution -> the exact version the patch was written against
    correctness: bool  # whether the code is wrong without it (refuse) or only slower (skip)
    without: str  # what running without it means, for the log line or the error

    def mismatches(self) -> list[str]:
        """'<distribution> <installed> (written for <version>)' for each library that differs."""
        return [f"{distribution} {installed} (written for {wanted})"
                for distribution, wanted in self.written_for.items()
                if (installed := installed_version(distribution)) != wanted]

    def applies(self) -> bool:
        """True on the versions the patch was written for. Otherwise False after a warning, or
        `PatchVersionError` for a correctness patch."""
        mismatches = self.mismatches()
        if not mismatches:
            return True
        library = self.name.split(".")[0]
        found = f"patch {self.name} (avperception_assets/patches/{library}.py) found {', '.join(mismatches)}"
        if self.correctness:
            raise PatchVersionError(
                f"{found}: refused, since without it {self.without}. Whether that version still needs it: "
                f"avperception_assets_tests/test_patches_{library}.py; then update the patch and its pin in "
                "pyproject.toml, or install the pinned version")
        if self.name not in _reported:
            _reported.add(self.name)
            log.warning("%s: not applied, so %s", found, self.without)
        return False
