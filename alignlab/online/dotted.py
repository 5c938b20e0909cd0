"""Objects named by dotted path in a config (tools, environments, reward functions), imported with an
error that says what is missing instead of a traceback."""

from __future__ import annotations

import importlib
from typing import Any

from alignlab.errors import ConfigError

__all__ = ["import_object"]


def import_object(path: str, what: str) -> Any:
    """The object at dotted `path`: the longest prefix that imports as a module, then its attributes.

    Raises:
        ConfigError: starting `{what} could not be imported:` and saying what is missing: the module (run
        from the folder that holds it, or add that folder to PYTHONPATH), an attribute, or what the
        module's own import raised.
    """
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
                continue  # this prefix is no module: try a shorter one
            raise ConfigError(f"{what} could not be imported: importing {module!r} raised {e!r}") from None
        except Exception as e:
            raise ConfigError(f"{what} could not be imported: importing {module!r} raised {e!r}") from None
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                raise ConfigError(f"{what} could not be imported: {'.'.join(parts[:i])!r} has no {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(
        f"{what} could not be imported: there is no module {parts[0]!r}; run from the folder that holds "
        f"{parts[0]}.py, or add that folder to PYTHONPATH"
    )
