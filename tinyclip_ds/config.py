"""Typed recipe machinery: YAML files with inheritance, command-line overrides, validation.

A recipe is a YAML file that maps onto a tree of dataclasses (see `tinyclip_ds.recipe`).
Each component's dataclass lives next to the code it configures; this module only knows
how to fill such a tree from dictionaries and how to complain precisely when it cannot.

- ``base: other.yaml`` (or a list of files) inherits from other recipes or fragments, paths
  relative to the including file; later bases and the file itself override earlier ones.
- ``--set a.b.c=value`` overrides one field; the value is parsed to the field's type.
- Every field declares its default, help and valid values in its own `option(...)`: a range
  for every int and float (`check_ranges`), choices for a str whose values come from a table.
- Every error names the dotted key, where it came from and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the package is installed in editable mode from it)."""


class RecipeError(ValueError):
    """A recipe (or an override) that cannot be turned into a valid configuration."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: ``low``/``high`` bounds (None = unbounded), each
    inclusive unless ``open_low``/``open_high``; ``note`` says what special values mean. A float
    must also be finite, so ``Range()`` accepts any finite value."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    @property
    def bounds(self) -> str:
        """``>= 0``, ``> 0``, ``<= 1`` or ``in [0, 1)``; '' when unbounded."""
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"

    def __str__(self) -> str:
        return f"{self.bounds} ({self.note})" if self.note else self.bounds


def option(default: Any, help: str, range: Range | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a one-line description shown by ``tinyclip-ds recipe``.

    ``range``: the values an int or float field accepts, which every int and float field must
    declare (`check_ranges`); ``Range()`` says deliberately that any finite value is accepted.
    ``choices``: the values a str field accepts, for values that come from a table (a fixed set
    is a ``Literal`` type).
    """
    metadata = {"help": help}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- YAML loading

def load_yaml_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """Load a recipe file with its ``base`` files merged in.

    Returns ``(tree, origins)``: the merged nested dict and, for every dotted leaf key, the
    file that set it last (so errors can say where a bad key came from).
    """
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError(f"recipe inheritance cycle: {cycle}")
    included_by = f" (named as a base in {_chain[-1]})" if _chain else ""
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}{included_by}")
    if not path.is_file():
        raise RecipeError(f"{path}{included_by} is a directory, not a recipe file")
    data = read_yaml(path, included_by) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")

    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: 'base' must be a file name or a list of file names, got {bases!r}")
    tree: dict = {}
    origins: dict = {}
    for base in bases:
        base_tree, base_origins = load_yaml_tree(path.parent / base, (*_chain, path))
        deep_merge(tree, base_tree)
        origins.update(base_origins)
    deep_merge(tree, data)
    origins.update({key: str(path) for key in dotted_leaves(data)})
    return tree, origins


def read_yaml(path: Path, context: str = "") -> Any:
    """The YAML document in ``path`` (UTF-8, a BOM allowed); unreadable, undecodable or
    malformed files are one-line `RecipeError`s naming the file and the place."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise RecipeError(f"{path}{context}: not UTF-8 text (byte {err.object[err.start]:#04x} on line "
                          f"{line}); save the recipe as UTF-8") from None
    except OSError as err:
        raise RecipeError(f"{path}{context}: cannot be read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        key, _, value = line.partition(":")
        hint = _brace_hint(value, f"{key.strip()}: {{}}")
        raise RecipeError(f"{path}{context}: invalid YAML{_yaml_problem(err)}{hint}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`` at line L, column C: what is wrong`` from a PyYAML error (its messages span lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    message = f"{problem} ({context})" if context else problem
    return f"{where}: {' '.join(message.split())}"


def deep_merge(into: dict, new: dict) -> dict:
    """Merge ``new`` into ``into`` recursively; mappings merge, anything else replaces."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def dotted_leaves(tree: dict, prefix: str = "") -> list[str]:
    """All leaf keys of a nested dict as dotted paths."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys += dotted_leaves(value, dotted + ".")
        else:
            keys.append(dotted)
    return keys


# --------------------------------------------------------------------------- overrides

def apply_override(tree: dict, origins: dict, schema: type, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw tree.

    The value is parsed according to the type of the field it lands on; keys under a
    free-form mapping field (such as ``deepspeed.``) are parsed as YAML scalars.
    """
    if "=" not in assignment:
        raise RecipeError(f"--set expects key=value, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    field_type = _type_at(schema, parts, dotted)
    if field_type is _FREE_FORM:
        value = _yaml_value(text, dotted) if text.strip() else ""
    else:
        value = parse_text(text, field_type, dotted)
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    origins[dotted] = "--set"


_FREE_FORM = object()


def _type_at(schema: type, parts: list[str], dotted: str) -> Any:
    """The declared type of the field at ``parts``; ``_FREE_FORM`` inside a dict field."""
    cls = schema
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            raise unknown_key_error(dotted, "--set", schema, prefix, list(fields))
        hint = field_types(cls)[part]
        if _is_mapping(hint):
            return _FREE_FORM
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise RecipeError(f"--set {dotted}: '{dotted}' is a section, not a field; "
                                  f"set one of its fields, e.g. {dotted}.{dataclasses.fields(hint)[0].name}=...")
            return hint
        if not dataclasses.is_dataclass(hint):
            raise RecipeError(f"--set {dotted}: '{'.'.join(parts[:i + 1])}' is a field of type "
                              f"{type_name(hint)}, it has no sub-keys")
        cls = hint
    raise AssertionError("unreachable")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_text(text: str, hint: Any, key: str) -> Any:
    """Parse a command-line string into a value of type ``hint`` (then validated)."""
    stripped = text.strip()
    origin = typing.get_origin(hint)
    if hint is str:
        return text
    if hint is bool:
        if stripped.lower() in _TRUE | _FALSE:
            return stripped.lower() in _TRUE
        raise type_error(key, hint, text, "--set")
    if hint in (int, float):
        try:
            return hint(stripped)
        except ValueError:
            raise type_error(key, hint, text, "--set") from None
    if origin is Literal:
        return stripped
    # lists, optionals and unions: YAML syntax, e.g. [0, 1, 10, 11] or null
    return _yaml_value(stripped, key)


def _yaml_value(text: str, key: str) -> Any:
    """A ``--set`` value written in YAML syntax."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        hint = _brace_hint(text, f"--set '{key}={{}}'")
        raise RecipeError(f"--set {key}={text}: not a valid YAML value{_yaml_problem(err)}{hint}") from None


_BRACE_PATTERN = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")  # shards/{00000..00331}.tar, {a,b}.tar


def _brace_hint(value: str, form: str) -> str:
    """What to write instead of a ``[...]`` list holding a shard brace pattern, which YAML reads
    as a mapping and refuses: the list with its items quoted, shown in ``form`` (a format with
    one ``{}``); '' for any other YAML problem."""
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]") and _BRACE_PATTERN.search(value)):
        return ""
    items, depth, start = [], 0, 1
    for i, char in enumerate(value[1:-1], start=1):  # commas inside {a,b} do not end an item
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    items.append(value[start:-1])
    quoted = "[" + ", ".join(json.dumps(item.strip().strip("'\"")) for item in items) + "]"
    return f"; a brace pattern inside [...] needs quotes: {form.format(quoted)}"


# --------------------------------------------------------------------------- building

def build(schema: type, tree: dict, origins: dict | None = None, prefix: str = "",
          root: type | None = None) -> Any:
    """Turn a nested dict into an instance of the dataclass ``schema``, checking every key."""
    origins = origins or {}
    root = root or schema
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = field_types(schema)
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise unknown_key_error(dotted, origin_of(dotted, origins), root, prefix.rstrip("."),
                                    list(fields))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"'{dotted}' ({origin_of(dotted, origins)}) is a section and "
                                  f"needs a mapping of its fields, got {value!r}")
            kwargs[key] = build(hint, value, origins, dotted + ".", root)
        else:
            kwargs[key] = check_value(value, hint, dotted, origin_of(dotted, origins))
    return schema(**kwargs)


def field_types(schema: type) -> dict[str, Any]:
    """The type of each field of the dataclass ``schema`` as a recipe value: its annotation or,
    for a field with ``choices``, the Literal of them (parsed, checked and described alike)."""
    hints = typing.get_type_hints(schema)
    return {f.name: Literal[f.metadata["choices"]] if "choices" in f.metadata else hints[f.name]
            for f in dataclasses.fields(schema)}


def check_value(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Validate (and gently coerce) ``value`` against the type ``hint``."""
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin_type in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, key, origin)
            except RecipeError:
                pass
        raise type_error(key, hint, value, origin)
    if origin_type is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        raise RecipeError(f"'{key}' ({origin}) must be one of {choices}; got {value!r}")
    if origin_type in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise type_error(key, hint, value, origin)
        return [check_value(v, args[0], f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if origin_type is dict or hint is dict:
        if not isinstance(value, dict):
            raise type_error(key, hint, value, origin)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise type_error(key, hint, value, origin)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise type_error(key, hint, value, origin)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise type_error(key, hint, value, origin)
    if hint is str:
        if isinstance(value, str):
            return value
        raise type_error(key, hint, value, origin)
    raise TypeError(f"unsupported recipe field type {hint!r} for '{key}'")


def origin_of(dotted: str, origins: dict) -> str:
    """The file (or ``--set``) that set ``dotted`` or, for a section, the last of its keys."""
    if dotted in origins:
        return origins[dotted]
    below = [o for k, o in origins.items() if k.startswith(dotted + ".")]
    return below[-1] if below else "recipe"


def _is_mapping(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def type_name(hint: Any) -> str:
    """A readable name for a field type, e.g. ``int``, ``str | list[int]``, ``'a' | 'b'``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{type_name(args[0])}]"
    if origin is dict or hint is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def type_error(key: str, hint: Any, value: Any, origin: str) -> RecipeError:
    return RecipeError(f"'{key}' ({origin}) expects {type_name(hint)}, got {value!r} "
                       f"({type(value).__name__})")


def all_dotted_fields(schema: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a dataclass tree."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_dotted_fields(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def unknown_key_error(dotted: str, origin: str, root: type, section: str,
                      valid: list[str]) -> RecipeError:
    """An error naming the unknown key, its file and the closest valid key."""
    name = dotted.rsplit(".", 1)[-1]
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        suggestion = prefix + close[0]
    else:
        # The key may belong to another section: look for it by its last component.
        everywhere = all_dotted_fields(root)
        by_name = [k for k in everywhere if k.rsplit(".", 1)[-1] == name]
        fuzzy = difflib.get_close_matches(dotted, everywhere, n=1, cutoff=0.4)
        suggestion = (by_name or fuzzy or [None])[0]
    hint = f"; did you mean '{suggestion}'?" if suggestion else \
        f"; valid keys here: {', '.join(prefix + v for v in valid)}"
    return RecipeError(f"unknown recipe key '{dotted}' (from {origin}){hint}")


# --------------------------------------------------------------------------- ranges

def numeric_fields(obj: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field, float]]:
    """``(dotted key, field, value)`` of every int and float field of a config tree."""
    found = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            found += numeric_fields(value, f"{prefix}{f.name}.")
        elif hints[f.name] in (int, float):
            found.append((prefix + f.name, f, value))
    return found


def check_ranges(obj: Any, origins: dict) -> None:
    """Refuse any int or float field of a config tree outside the range its `option` declares
    (a float must also be finite); the error names the key and the file that set it."""
    for key, f, value in numeric_fields(obj):
        if "range" not in f.metadata:
            raise TypeError(f"the numeric field '{key}' declares no range: give its option(...) a "
                            f"range=Range(...), or range=Range() to accept any finite value")
        rule = f.metadata["range"]
        if value not in rule:
            finite = "a finite number" if isinstance(value, float) else ""
            requirement = " ".join(part for part in (finite, str(rule)) if part)
            raise RecipeError(f"'{key}' ({origin_of(key, origins)}) must be {requirement}, got {value!r}")


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists, ready for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, help)`` for every field, for ``tinyclip-ds recipe``; the
    type of a numeric field shows its range (``int >= 1``)."""
    rows = []
    hints = field_types(schema)
    defaults = schema()
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
        else:
            default = getattr(defaults, f.name)
            bounds = f.metadata["range"].bounds if "range" in f.metadata else ""
            rows.append((prefix + f.name, f"{type_name(hint)} {bounds}".rstrip(), repr(default),
                         f.metadata.get("help", "")))
    return rows
