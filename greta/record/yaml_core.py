"""YAML 1.2 core-schema scalars for PyYAML: what an unquoted value in a params file or a `-p key=value` means.

PyYAML resolves plain scalars by YAML 1.1, where `0256` is octal (174), `1:00` sexagesimal (60), `0b1` binary,
`yes`/`on` booleans, `2026-01-01` a date, and `1e3` (no dot) a string. The YAML 1.2 core schema has none of
that; its scalars are:

    null   ~  null  Null  NULL  (empty)
    bool   true  True  TRUE  false  False  FALSE
    int    [-+]?[0-9]+ (decimal, leading zeros included: 0256 is 256)  0o[0-7]+  0x[0-9a-fA-F]+
    float  [-+]?(.[0-9]+ | [0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)?  [-+]?.inf (.Inf, .INF)  .nan (.NaN, .NAN)

and every other plain scalar is a string (`1_000`, `1:00`, `0b1`, `yes`, `inf`). CoreSchemaLoader is
PyYAML's SafeLoader with exactly these rules (quoted scalars stay strings, as in any YAML).
"""
from __future__ import annotations

import re

import yaml

_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


def _int(loader, node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)  # "0256" is 256: in the core schema a leading zero is just a digit


def _float(loader, node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


def _bool(loader, node) -> bool:
    return loader.construct_scalar(node).lower() == "true"


class CoreSchemaLoader(yaml.SafeLoader):
    """SafeLoader resolving plain scalars by the YAML 1.2 core schema (the module docstring)."""

    yaml_implicit_resolvers: dict = {}  # none of SafeLoader's YAML 1.1 rules (timestamps, merge keys, ...)


for _tag, _regexp, _first in (
        ("bool", _BOOL, "tTfF"), ("int", _INT, "-+0123456789"), ("float", _FLOAT, "-+.0123456789"),
        ("null", _NULL, ["~", "n", "N", ""])):
    CoreSchemaLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _regexp, list(_first))
for _tag, _make in (("int", _int), ("float", _float), ("bool", _bool)):
    CoreSchemaLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _make)

