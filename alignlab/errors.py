"""Errors a user can act on. The entry point prints their message without a traceback."""


class AlignlabError(Exception):
    """Base class: the message alone tells the user what to change."""


class ConfigError(AlignlabError):
    """A config value is missing, out of range or inconsistent with another one."""


class DataError(AlignlabError):
    """A data file or row cannot be used; the message names the file, row and field."""

    def __init__(self, source: str, problem: str, row: int | None = None, field: str | None = None):
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field = source, row, field


class ModelLoadError(AlignlabError):
    """A model or tokenizer could not be loaded from its path."""


class NonFiniteLossError(AlignlabError):
    """The training loss became NaN or infinite; raised before the step that would spread it."""
