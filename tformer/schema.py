"""Typed configuration sections: dataclasses built from parsed JSON/YAML with every key and
type checked. The lowest layer of tformer's configuration, shared by the model configs, the
tasks' data sections and the training config (:mod:`tformer.training.config`), so none of
them has to import another to raise the same error."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing


class ConfigError(ValueError):
    """A configuration file or override that does not fit the dataclasses."""


def unknown_key_error(where: str, key: str, valid, *, prefix: str = "config: ") -> ConfigError:
    """The error for an unknown key: it names the nearest valid key (one typo suggester for every
    config, model configs included)."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{prefix}unknown key {where}{key!r}.{hint} Valid keys: {valid}")


def _type_matches(value, annotation) -> bool:
    if annotation is typing.Any:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_matches(v, a) for v, a in zip(value, args))
        return all(_type_matches(v, args[0]) for v in value) if args else True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def from_dict(cls, values, where: str = ""):
    """Build dataclass ``cls`` from a dict, recursing into dataclass fields; unknown keys and
    values of the wrong type raise :class:`ConfigError` naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: section {where or cls.__name__!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(where, key, fields)
        annotation = hints[key]
        if typing.get_origin(annotation) is typing.Literal:
            kwargs[key] = check_choice(f"config: {where}{key}", value, typing.get_args(annotation))
            continue
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(annotation, value, f"{where}{key}.")
            continue
        if not _type_matches(value, annotation):
            raise ConfigError(f"config: {where}{key} must be {_describe(annotation)}, got {value!r}")
        if typing.get_origin(annotation) is tuple or (isinstance(value, list) and "tuple" in str(annotation)):
            value = tuple(value)
        kwargs[key] = value
    section = cls(**kwargs)
    # Remember which keys the file set: a task fills the others from its data (a model's
    # vocab_size), and a saved config writes back only these (see given_values).
    section.__dict__[_GIVEN] = frozenset(values)
    return section


_GIVEN = "_tformer_keys_given"


def given_keys(section) -> frozenset:
    """The keys of dataclass ``section`` that its file set (``from_dict`` records them); for a
    section built in code, the fields whose values differ from their defaults."""
    given = getattr(section, "__dict__", {}).get(_GIVEN)
    if given is not None:
        return given
    changed = set()
    for f in dataclasses.fields(section):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            changed.add(f.name)
            continue
        if getattr(section, f.name) != default:
            changed.add(f.name)
    return frozenset(changed)


def given_values(section) -> dict:
    """``{key: value}`` for the :func:`given_keys` of ``section``, as plain JSON-ready values
    (nested dataclasses as their own given values): what a saved config writes back."""
    given = given_keys(section)
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section) if f.name in given}


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return given_values(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def not_given(section, values: dict) -> dict:
    """The entries of ``values`` (values a task takes from its data) whose keys the file left
    unset in ``section``: the user's keys win over the data's."""
    given = given_keys(section)
    return {key: value for key, value in values.items() if key not in given}


def _describe(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def choices_of(literal) -> tuple:
    """The values of a ``Literal[...]`` type, as a tuple (what :func:`check_choice` takes)."""
    return typing.get_args(literal)


def check_choice(where: str, value, choices):
    """Return ``value`` if it is one of ``choices``, else raise :class:`ConfigError` naming
    ``where`` (the setting as its user wrote it: ``"config: training.strategy"``,
    ``"TransformerBlock: argument 'norm_position'"``) and suggesting the nearest valid choice.
    The one choice check of tformer: config sections, model configs and modules use it."""
    choices = tuple(choices)
    if isinstance(value, typing.Hashable) and value in choices:
        return value
    names = [str(choice) for choice in choices]
    close = difflib.get_close_matches(str(value), names, n=1) or difflib.get_close_matches(str(value).lower(), names,
                                                                                          n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where} must be one of {choices}, got {value!r}.{hint}")


def check_choices(section, owner: str) -> None:
    """Check every ``Literal``-typed field of dataclass ``section`` with :func:`check_choice`,
    naming it ``"<owner>: argument '<field>'"``: for sections built in code (:func:`from_dict`
    checks the same fields as it reads a file, naming the key path). Call it from ``__post_init__``."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if typing.get_origin(hints[f.name]) is typing.Literal:
            check_choice(f"{owner}: argument {f.name!r}", getattr(section, f.name), typing.get_args(hints[f.name]))


class UsageError(Exception):
    """An error the user can fix (a bad argument, a damaged input, a busy folder). Commands print
    it as one ``error: ...`` line (:func:`tformer.cli.errors.run_cli`)."""
