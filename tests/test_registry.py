"""alignlab.registry: one family of named variants, its properties, its config check and users' own."""

from __future__ import annotations

import sys
import textwrap

import pytest

from alignlab.errors import ConfigError
from alignlab.registry import Registry, import_object


def fresh() -> Registry:
    reg = Registry("loss type", "algorithm.loss_type", needs_lengths=False, sorts=False)

    @reg.register("plain")
    def plain(x):
        return x

    @reg.register("normed", needs_lengths=True)
    def normed(x, lengths):
        return x / lengths

    return reg


def test_names_properties_and_filters_come_from_the_registrations():
    reg = fresh()
    assert reg.names() == ("plain", "normed") and list(reg) == ["plain", "normed"] and len(reg) == 2
    assert reg.names(needs_lengths=True) == ("normed",)
    assert reg.names(needs_lengths=False, sorts=False) == ("plain",)
    assert reg["normed"].needs_lengths is True and reg["plain"].sorts is False
    assert reg["normed"].fn(6.0, 3.0) == 2.0
    assert "plain" in reg and "other" not in reg


def test_an_unknown_name_names_the_key_the_choices_and_the_closest():
    with pytest.raises(ConfigError, match=r"algorithm.loss_type: unknown loss type 'normd' \(did you mean normed\?\)"):
        fresh().check("normd")
    with pytest.raises(ConfigError, match=r"one of \('plain', 'normed'\)"):
        fresh()["zzz"]


def test_registration_refuses_an_undeclared_property_and_a_taken_name():
    reg = fresh()
    with pytest.raises(ValueError, match="unknown properties"):
        reg.register("x", needs_length=True)(lambda: 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("plain")(lambda x: x)


def test_users_name_their_own_function_by_dotted_path_or_target(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(
        textwrap.dedent(
            """
            def halve(x, factor=2.0):
                return x / factor
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_losses", raising=False)
    reg = fresh()
    entry = reg.resolve("my_losses.halve")
    assert entry.name == "my_losses.halve" and entry.needs_lengths is False and entry.fn(8.0) == 4.0
    assert reg.resolve("my_losses.halve") is entry  # registered once, found again
    bound = reg.resolve({"_target_": "my_losses.halve", "factor": 4.0})
    assert bound.fn(8.0) == 2.0 and bound.properties == entry.properties
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        reg.resolve("my_losses.nothing")


def test_a_user_module_that_registers_itself_keeps_its_properties(tmp_path, monkeypatch):
    reg = fresh()
    monkeypatch.setitem(sys.modules, "reg_holder", type(sys)("reg_holder"))
    sys.modules["reg_holder"].REG = reg
    (tmp_path / "own_losses.py").write_text(
        textwrap.dedent(
            """
            from reg_holder import REG

            @REG.register("per_token", needs_lengths=True)
            def per_token(x, lengths):
                return x / lengths
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_losses", raising=False)
    entry = reg.resolve("own_losses.per_token")
    assert entry.name == "per_token" and entry.needs_lengths is True
    assert reg.names(needs_lengths=True) == ("normed", "per_token")


def test_import_object_says_which_part_is_missing():
    assert import_object("alignlab.registry.Registry", "x") is Registry
    with pytest.raises(ConfigError, match="there is no module 'nosuchpkg'"):
        import_object("nosuchpkg.f", "reward function 'nosuchpkg.f'")


def test_a_name_given_as_an_argument_raises_value_error_with_the_arguments_name():
    reg = fresh()
    assert reg.entry("normed").needs_lengths is True
    with pytest.raises(ValueError, match=r"loss_type must be one of \('plain', 'normed'\), got 'normd'"):
        reg.entry("normd")
    with pytest.raises(ValueError, match=r"^KL estimator must be one of \(\), got 'k4'"):
        Registry("KL estimator").entry("k4")
