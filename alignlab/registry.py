"""Named variants and objects named by dotted path: the one way alignlab lists what a config may name.

A *registry* holds one family of variants (DPO loss types, GRPO loss types, advantage estimators, reward
functions, rollout-correction modes, data-row formats, ...). A variant is one decorated function, and the
name lists, the properties the rest of the code asks about (e.g. "needs the answers' lengths") and the
config check ("must be one of ...") all come from the registry, so adding a variant is one function in
one file. Users add their own either by decorating with the same registry in their own module, or by
naming a function by dotted path in the config (`algorithm.loss_type=mypkg.losses.my_loss`); the dotted
object is imported with an error that says what is missing (`import_object`), as for tools,
environments and reward functions.

This module imports nothing of alignlab but its errors, so every layer can hold a registry.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from alignlab.errors import ConfigError

__all__ = ["Entry", "Registry", "import_object"]

F = TypeVar("F", bound=Callable[..., Any])


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


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered variant: its name, its function, and its properties (the registry's defaults
    updated by what `register` was given)."""

    name: str
    fn: F
    properties: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.properties[key]
        except KeyError:
            raise AttributeError(f"{self.name!r} has no property {key!r}") from None


class Registry(Generic[F]):
    """A named family of variants, in registration order.

    Args:
        kind: what the variants are, for messages ("DPO loss type").
        config_key: the config key that names one (`algorithm.loss_type`), for messages; None when no
            single key does.
        **defaults: every property a variant has, with the value it takes unless `register` says
            otherwise. `register` refuses a property not declared here, so a typo cannot pass unseen.

    Example::

        DPO_LOSSES = Registry("DPO loss type", "algorithm.loss_type", needs_lengths=False)

        @DPO_LOSSES.register("sigmoid_norm", needs_lengths=True)
        def sigmoid_norm(...): ...

        DPO_LOSSES.names(needs_lengths=True)  # ("sigmoid_norm",)
        DPO_LOSSES["sigmoid_norm"].fn
    """

    def __init__(self, kind: str, config_key: str | None = None, **defaults: Any):
        self.kind, self.config_key, self.defaults = kind, config_key, defaults
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str | None = None, **properties: Any) -> Callable[[F], F]:
        """A decorator that adds the function under `name` (default: its `__name__`) with `properties`.
        Returns the function unchanged. Raises ValueError for a name already taken or a property the
        registry does not declare."""

        def add(fn: F) -> F:
            self.add(name or fn.__name__, fn, **properties)
            return fn

        return add

    def add(self, name: str, fn: F, **properties: Any) -> Entry[F]:
        """Register `fn` under `name` (see `register`); returns its entry."""
        unknown = set(properties) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r}: unknown properties {sorted(unknown)}; known: {sorted(self.defaults)}"
            )
        existing = self._entries.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"{self.kind} {name!r} is already registered (to {existing.fn!r})")
        entry = Entry(name, fn, {**self.defaults, **properties})
        self._entries[name] = entry
        return entry

    def names(self, **where: Any) -> tuple[str, ...]:
        """The registered names, in registration order; with `where`, only those whose properties equal
        every given value (`names(needs_lengths=True)`)."""
        return tuple(n for n, e in self._entries.items() if all(e.properties[k] == v for k, v in where.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> Entry[F]:
        """The entry of a registered name. Raises ConfigError naming the config key, the known names and
        the closest one."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(self._unknown(name)) from None

    def entry(self, name: Any) -> Entry[F]:
        """The entry of a registered name given to a function as an argument (a loss called with its
        loss type): no config in sight, so it raises ValueError `<arg> must be one of (...), got <name>`,
        <arg> the config key's last part (the argument's name) or the kind."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        arg = self.config_key.rsplit(".", 1)[-1] if self.config_key else self.kind
        raise ValueError(f"{arg} must be one of {self.names()}, got {name!r}")

    def _unknown(self, name: Any) -> str:
        key = f"{self.config_key}: " if self.config_key else ""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (
            f"{key}unknown {self.kind} {name!r}{hint}; one of {self.names()}, or a dotted path to your own "
            f"function (e.g. mypkg.module.function)"
        )

    def resolve(self, spec: Any) -> Entry[F]:
        """The entry a config value names: a registered name; a dotted path to a function (imported;
        if importing registered it, that entry, else it is registered under the path with the default
        properties); or a mapping `{_target_: dotted.path, **kwargs}` (the function with those keyword
        arguments bound). Raises ConfigError for an unknown name or an import that fails."""
        if isinstance(spec, str) and spec in self._entries:
            return self._entries[spec]
        if isinstance(spec, Mapping) and "_target_" in spec:
            kwargs = {k: v for k, v in spec.items() if k != "_target_"}
            base = self.resolve(str(spec["_target_"]))
            if not kwargs:
                return base
            return Entry(base.name, functools.partial(base.fn, **kwargs), base.properties)
        if isinstance(spec, str) and "." in spec:
            where = f"{self.config_key} {spec!r}" if self.config_key else f"{self.kind} {spec!r}"
            fn = import_object(spec, where)
            if not callable(fn):
                raise ConfigError(f"{where} names {fn!r}, which cannot be called")
            for entry in self._entries.values():
                if entry.fn is fn:
                    return entry
            return self.add(spec, fn)
        raise ConfigError(self._unknown(spec))

    def check(self, spec: Any) -> str:
        """The name of the entry `spec` resolves to (see `resolve`); the config check of a key that names
        one variant. Raises ConfigError as `resolve`."""
        return self.resolve(spec).name
