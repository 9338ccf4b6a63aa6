"""Config values read by their declared type, from override text and from YAML files alike.

YAML guesses a type from the text (``007`` is 7, ``1e3`` a string in YAML 1.1, ``true`` a bool), so a
string setting would get whatever YAML made of it. Here the text stays text until the setting's type
(``str``, ``int``, ``float``, ``bool``, a ``Literal``, ``Optional[...]``, ``list[...]``) reads it:

- a string is the text as written (``model.path=007`` is ``'007'``); quotes around it are removed, which
  is how an optional string is set to the word null (``logging.run_name="'null'"``);
- an optional setting is None for ``null``, ``~``, ``none`` or nothing;
- integers are decimal digits, floats anything Python's ``float`` reads, booleans ``true/false``
  (``yes/no``, ``on/off``, ``1/0``);
- a list is ``[a, b]`` or ``a,b``, each item read by the item type.

YAML files are read with ``yaml.compose``: their structure (sections, lists) comes from YAML, each
scalar's text from the file, and a quoted scalar is a string whatever it looks like.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from dpokit.errors import DpokitError

NULLS = ("null", "Null", "NULL", "~", "none", "None", "")
TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
INTEGER = re.compile(r"[-+]?\d+")
QUOTES = ("'", '"')
YAML_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}  # YAML's spellings
ITEM = re.compile(r"""\s*('[^']*'|"[^"]*"|[^,]*?)\s*,""")  # a list item: quoted (commas and all) or up to a comma


@dataclass(frozen=True)
class Text:
    """A config value as written: the text, and whether it was quoted (then it is a string whatever it reads as)."""

    text: str
    quoted: bool = False
    override: bool = False  # typed on the command line (errors then name no file)

    @classmethod
    def of(cls, written: str, override: bool = False) -> "Text":
        """Override text: surrounding spaces dropped, and matching quotes around it removed (and remembered)."""
        written = written.strip()
        if len(written) >= 2 and written[0] == written[-1] and written[0] in QUOTES:
            return cls(written[1:-1], quoted=True, override=override)
        return cls(written, override=override)


def read_yaml_tree(text: str, source: str) -> Any:
    """A YAML document as nested dicts and lists whose scalars are `Text` (untyped until `read_value`)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise DpokitError(f"{source}: not valid YAML: {exc}") from exc
    return {} if node is None else _tree(node, source)


def _tree(node: yaml.Node, source: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        tree = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise DpokitError(f"{source}: line {key.start_mark.line + 1}: a key must be a plain name")
            tree[key.value] = _tree(value, source)
        return tree
    if isinstance(node, yaml.SequenceNode):
        return [_tree(item, source) for item in node.value]
    return Text(node.value, quoted=node.style in QUOTES)


def where(value: Any, source: str) -> str:
    """The prefix of an error about `value`: its file (``source: ``), or nothing for a command-line override."""
    first = value[0] if isinstance(value, list) and value else value
    return "" if isinstance(first, Text) and first.override else f"{source}: "


def read_value(hint: Any, value: Any, key: str, source: str) -> Any:
    """`value` (a `Text`, a list of them, or an already typed Python value) as type `hint`, or a
    `DpokitError` naming `key`, what was given and what is expected (and the file it came from)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, Text) and not value.quoted and value.text in NULLS):
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return read_value(inner[0], value, key, source)
    if origin is list:
        if isinstance(value, Text):
            value = _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise DpokitError(f"{where(value, source)}{key} must be a list, e.g. [a, b], got {_shown(value)}")
        return [read_value(args[0], item, f"{key}[{index}]", source) for index, item in enumerate(value)]
    if isinstance(value, (list, dict)):
        raise DpokitError(f"{where(value, source)}{key} must be {_expected(hint)}, got {_shown(value)}")
    if origin is Literal:
        text = value.text if isinstance(value, Text) else value
        if text not in args:
            raise DpokitError(
                f"{where(value, source)}{key}={text!r} is not valid; choose one of: {', '.join(map(str, args))}"
            )
        return text
    reader = READERS.get(hint)
    if reader is None:  # Any: the scalar as YAML would read it
        return yaml.safe_load(value.text) if isinstance(value, Text) and not value.quoted else _plain(value)
    result = reader(value)
    if result is None:
        raise DpokitError(f"{where(value, source)}{key} must be {_expected(hint)}, got {_shown(value)}")
    return result


def _split_list(value: Text) -> list[Text]:
    text = value.text.strip()
    if value.quoted:
        return [value]
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [Text.of(item, value.override) for item in ITEM.findall(text + ",")] if text.strip() else []


def _plain(value: Any) -> Any:
    return value.text if isinstance(value, Text) else value


def _read_str(value: Any) -> str | None:
    if isinstance(value, Text):
        return value.text
    return value if isinstance(value, str) else None


def _read_int(value: Any) -> int | None:
    if isinstance(value, Text):
        return int(value.text) if INTEGER.fullmatch(value.text.strip()) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        return None
    return int(value)


def _read_float(value: Any) -> float | None:
    if isinstance(value, Text):
        text = value.text.strip()
        if text.lower() in YAML_FLOATS:
            return YAML_FLOATS[text.lower()]
        try:
            return float(text)
        except ValueError:
            return None
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def _read_bool(value: Any) -> bool | None:
    if isinstance(value, Text):
        text = value.text.strip().lower()
        return True if text in TRUE else False if text in FALSE else None
    return value if isinstance(value, bool) else None


READERS = {str: _read_str, int: _read_int, float: _read_float, bool: _read_bool}
EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _expected(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "a list"
    return EXPECTED.get(hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    if isinstance(value, Text):
        return repr(value.text)
    if isinstance(value, list):
        return repr([_plain(item) for item in value])
    return repr(value)


def written(hint: Any, value: Any) -> str:
    """The override text that `read_value` reads back as `value` of type `hint` (strings quoted where
    they would read as null)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        item = (typing.get_args(hint) or (Any,))[0]
        return "[" + ",".join(written(item, v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        needs_quotes = value in NULLS or value != value.strip() or "," in value or value[:1] in QUOTES + ("[",)
        return f"'{value}'" if needs_quotes else value
    return repr(value)
