"""Config values by type: YAML files read safely, and values (from YAML, or an override's text
as written) converted to the type of their key, each failure a `ConfigError` naming the key and
where the value came from. `config.py` owns the keys; this module knows only types.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from jaxtune.errors import ConfigError


def check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


class _Duplicate(Exception):
  def __init__(self, key: Any, line: int, first: int):
    super().__init__(key, line, first)
    self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
  """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

  def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
      if key_node.tag == "tag:yaml.org,2002:merge":
        continue
      key = self.construct_object(key_node, deep=deep)
      try:
        first = seen.setdefault(key, key_node.start_mark.line + 1)
      except TypeError:  # An unhashable key: PyYAML's own error.
        continue
      if first != key_node.start_mark.line + 1:
        raise _Duplicate(key, key_node.start_mark.line + 1, first)
    return super().construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


def read_yaml(path: str) -> dict:
  """The mapping in the YAML file at `path`; an unreadable file, invalid YAML, a key given twice
  or a document that is not a mapping is a ConfigError naming the file."""
  try:
    with open(path, "rb") as f:  # PyYAML detects the encoding; invalid text is a YAMLError.
      data = yaml.load(f, _Loader)  # A SafeLoader.
  except OSError as e:
    raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
  except _Duplicate as e:
    message = f"duplicate key {e.key!r} (first on line {e.first})"
    raise ConfigError(f"{path}:{e.line}: {message}") from None
  except yaml.YAMLError as e:
    message = " ".join(str(e).split())  # One line.
    raise ConfigError(f"config file {path} is not valid YAML: {message}") from None
  data = {} if data is None else data
  check(isinstance(data, dict), f"config file {path} must be a mapping of sections")
  return data


def unknown(key: str, known: Mapping[str, Any], where: str) -> str:
  close = difflib.get_close_matches(key.rpartition(".")[2].partition("=")[0], list(known), n=1)
  hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
  return f"unknown key {key}{where}{hint}"


class Text(str):
  """An override's value as written on the command line, converted by its key's type."""


_INT_RE = re.compile(r"[+-]?[0-9]+")
_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _shown(text: str) -> str:
  """An override's text as error messages show it: numbers bare, other text quoted."""
  try:
    float(text)
    return text.strip()
  except ValueError:
    return repr(str(text))


def _from_text(key: str, text: Text, hint: Any, where: str) -> Any:
  """An override's text as the (non-optional) type `hint`, or a ConfigError naming `key`."""
  args = typing.get_args(hint)
  shown = f"{key}={_shown(text)}{where}"
  if typing.get_origin(hint) is Literal:
    check(text in args, f"{key}={text!r}{where} must be one of {', '.join(map(str, args))}")
    return str(text)
  if typing.get_origin(hint) is tuple:  # "a,b,c" or "[a, b, c]".
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
      body = body[1:-1]
    items = [Text(item.strip()) for item in body.split(",")] if body.strip() else []
    return tuple(coerce(key, item, args[0], where) for item in items)
  if hint is str:
    return str(text)
  if hint is bool:
    check(text.strip().lower() in _BOOLS, f"{shown} must be true or false")
    return _BOOLS[text.strip().lower()]
  if hint is int:
    check(bool(_INT_RE.fullmatch(text.strip())), f"{shown} must be an integer")
    return int(text.strip())
  if hint is float:
    try:
      value = float(text.strip())
    except ValueError:
      raise ConfigError(f"{shown} must be a number") from None
    check(math.isfinite(value), f"{shown} must be a finite number")
    return value
  raise TypeError(f"config type {hint} of {key} is not supported")


def coerce(key: str, value: Any, hint: Any, where: str) -> Any:
  """Converts `value` (from YAML, or an override's `Text`) to the type `hint` or raises a
  ConfigError naming `key`."""
  args = typing.get_args(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
      check(type(None) in args, f"{key}{where} cannot be None")
      return None
    (hint,) = [a for a in args if a is not type(None)]
    args = typing.get_args(hint)
  if isinstance(value, Text):
    return _from_text(key, value, hint, where)
  if typing.get_origin(hint) is Literal:
    check(value in args, f"{key}={value!r}{where} must be one of {', '.join(map(str, args))}")
    return value
  if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a YAML list or "a,b,c".
    items = value.split(",") if isinstance(value, str) else value
    check(isinstance(items, list | tuple), f"{key}={value!r}{where} must be a list")
    return tuple(coerce(key, item, args[0], where) for item in items)
  try:
    if hint is bool:
      if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
      check(isinstance(value, bool), f"{key}={value!r}{where} must be true or false")
      return value
    if hint is int:
      check(not isinstance(value, bool | float), f"{key}={value!r}{where} must be an integer")
      return int(value)
    if hint is float:
      check(not isinstance(value, bool), f"{key}={value!r}{where} must be a number")
      number = float(value)  # YAML reads "1e-4" as a string.
      check(math.isfinite(number), f"{key}={value!r}{where} must be a finite number")
      return number
    if hint is str:
      check(isinstance(value, str | int | float), f"{key}={value!r}{where} must be a string")
      return str(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}={value!r}{where} must be of type {hint.__name__}") from None
  raise TypeError(f"config type {hint} of {key} is not supported")
