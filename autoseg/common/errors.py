"""User-facing errors.

Anything the user can fix (a bad file, a wrong option, a missing dataset) raises an
`AutosegError`; the CLI prints it as one line, `error: <where>: <problem>`, and exits 2
with no traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from os import PathLike


class AutosegError(Exception):
    """A problem the user can fix, optionally tied to the file or key it concerns."""

    def __init__(self, message: str, where: str | PathLike[str] | None = None) -> None:
        self.message = message
        self.where = None if where is None else str(where)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class DatasetError(AutosegError):
    """A raw dataset (dataset.json, images, labels) is missing, unreadable or inconsistent."""


class DatasetErrors(DatasetError):
    """Several dataset problems found at once (verification reports all, not just the first)."""

    def __init__(self, errors: list[DatasetError]) -> None:
        if not errors:
            raise ValueError("DatasetErrors needs at least one error")
        self.errors = list(errors)
        super().__init__(f"{len(errors)} problem(s) found; first: {errors[0]}")

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class ConfigError(AutosegError):
    """A bad `--set key=value`, sweep file entry or plan override."""


class ConfigErrors(ConfigError):
    """Several problems in one config file at once (a sweep file shows all of them, not just the first).

    ``where`` and ``message`` are the first problem's, so code that reads one error still works.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        self.errors = list(errors)
        super().__init__(errors[0].message, errors[0].where)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in getattr(self, "errors", ())) or super().__str__()
