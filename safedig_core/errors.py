"""The one error family SafeDIG raises for problems a user can fix."""

from __future__ import annotations

import os


class SafeDIGError(Exception):
    """A problem with SafeDIG's input: a message naming what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None, *, path: str | os.PathLike | None = None):
        self.problem = problem
        self.fix = fix
        self.path = None if path is None else os.fspath(path)
        where = f"{self.path}: " if self.path else ""
        how = f" Fix: {fix}" if fix else ""
        super().__init__(f"{where}{problem}.{how}")


class PackError(SafeDIGError):
    """A dictionary pack file is malformed, or does not fit the model it is applied to."""


class ArchitectureError(SafeDIGError):
    """The model is not one SafeDIG knows how to steer."""
