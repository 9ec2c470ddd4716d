"""JSON Schema (draft 2020-12) files generated from the field specs.

The files under ``schemas/json/`` are for other languages and tools; Python code uses
``Record.from_dict``. Both come from the same :class:`~schemas.fields.Field` specs, and a
test asserts that the committed files equal what this module generates. Rules that JSON
Schema cannot express (``errors <= count``, ``expires_at > issued_at``, the encoded size
of free-form objects, ...) are stated in ``$comment`` / ``description``.

Usage::

    python -m schemas.jsonschema --write   # regenerate schemas/json/*.schema.json
    python -m schemas.jsonschema --check   # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.fields import (
    FREE_MAX_DEPTH,
    LINE_CLASS,
    LINE_PATTERN,
    TOKEN_CLASS,
    TOKEN_PATTERN,
    Field,
)
from schemas.records import RECORD_CLASSES, Record

__all__ = [
    "DRAFT",
    "JSON_DIR",
    "field_schema",
    "record_schema",
    "generate",
    "render",
    "load",
    "iter_errors",
    "main",
]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
JSON_DIR = Path(__file__).resolve().parent / "json"


def _num(b: float) -> int | float:
    return int(b) if float(b).is_integer() else float(b)


def _forbidden(char_class: str) -> str:
    """``[^abc]`` (the allowed characters) -> ``[abc]`` (the forbidden ones)."""
    assert char_class.startswith("[^") and char_class.endswith("]"), char_class
    return "[" + char_class[2:]


# ``^[^...]*$`` patterns, stated as "contains none of these characters": unanchored, so
# every regex engine gives the same verdict.
_NONE_OF = {LINE_PATTERN: _forbidden(LINE_CLASS), TOKEN_PATTERN: _forbidden(TOKEN_CLASS)}


def _pattern_schema(pattern: str) -> dict[str, Any]:
    """JSON Schema keywords for an anchored ``^...$`` pattern, portable across engines.

    ECMA-262 ``$`` matches only at the end of the input, but Python's ``re`` (used by the
    ``jsonschema`` package, among others) also matches it before a final ``"\\n"``, so
    ``^X$`` would accept ``"x\\n"`` there. Character-class patterns are stated as
    "contains none of": ``not: {pattern: "[forbidden]"}``; any other pattern (which, by
    the rule in ``schemas/fields.py``, never matches a line feed) keeps its anchors and
    gains ``not: {pattern: "\\n"}``, which makes ``$`` mean end of input everywhere. The
    ``not`` holds ``type: string`` so that it does not reject ``null`` or other types.
    """
    forbidden = _NONE_OF.get(pattern)
    if forbidden is not None:
        return {"not": {"type": "string", "pattern": forbidden}}
    return {"pattern": pattern, "not": {"type": "string", "pattern": "\\n"}}


def field_schema(f: Field) -> dict[str, Any]:
    """The JSON Schema of one field (or item, or map value)."""
    s: dict[str, Any] = {}
    if f.description:
        s["description"] = f.description
    s["type"] = [f.type, "null"] if f.accepts_null else f.type
    if f.type == "string":
        if f.enum is not None:
            s["enum"] = [*f.enum, None] if f.accepts_null else list(f.enum)
        if f.min_length:
            s["minLength"] = f.min_length
        if f.max_length is not None:
            s["maxLength"] = f.max_length
        if f.pattern is not None:
            s.update(_pattern_schema(f.pattern))
    elif f.type in ("number", "integer"):
        for key, b in (
            ("minimum", f.minimum),
            ("exclusiveMinimum", f.exclusive_minimum),
            ("maximum", f.maximum),
            ("exclusiveMaximum", f.exclusive_maximum),
        ):
            if b is not None:
                s[key] = _num(b)
    elif f.type == "array":
        assert f.items is not None
        s["items"] = field_schema(f.items)
        if f.max_items is not None:
            s["maxItems"] = f.max_items
    elif f.type == "object":
        kind = f.object_kind
        if kind == "fixed":
            s.update(_object_body(f))
        elif kind == "map":
            assert f.values is not None
            if f.keys is not None:
                keys = field_schema(f.keys)
                keys.pop("description", None)
                s["propertyNames"] = keys
            s["additionalProperties"] = field_schema(f.values)
            if f.max_properties is not None:
                s["maxProperties"] = f.max_properties
        else:
            s["$comment"] = (
                f"Plain JSON values only, nested at most {FREE_MAX_DEPTH} levels deep, "
                f"at most {f.max_bytes} bytes as compact JSON (checked by Stanch, not "
                "expressible in JSON Schema)."
            )
    return s


def _object_body(f: Field) -> dict[str, Any]:
    assert f.props is not None
    body: dict[str, Any] = {
        "properties": {p.name: field_schema(p) for p in f.props},
        "required": [p.name for p in f.props if p.required],
        "additionalProperties": False,
    }
    expressed = [c.schema for c in f.checks if c.schema is not None]
    if expressed:
        body["allOf"] = expressed
    unexpressed = [c.description for c in f.checks if c.schema is None]
    if unexpressed:
        body["$comment"] = (
            "Also checked by Stanch (not expressible in JSON Schema): "
            + "; ".join(unexpressed)
            + "."
        )
    return body


def record_schema(cls: type[Record]) -> dict[str, Any]:
    """The complete schema document of one record type."""
    spec = cls.SPEC
    doc: dict[str, Any] = {
        "$schema": DRAFT,
        "title": cls.__name__,
        "description": spec.description.replace("``", ""),
        "type": "object",
    }
    doc.update(_object_body(spec))
    return doc


def generate() -> dict[str, dict[str, Any]]:
    """File name (``request.schema.json``) -> schema document, for every record type."""
    return {f"{cls.NAME}.schema.json": record_schema(cls) for cls in RECORD_CLASSES}


def render(schema: dict[str, Any]) -> str:
    """The exact text committed for a schema: 2-space indent, ASCII, trailing newline."""
    return json.dumps(schema, indent=2, ensure_ascii=True) + "\n"


def stale_files(directory: Path = JSON_DIR) -> list[str]:
    """Names of files that differ from what would be generated (missing or extra too)."""
    wanted = {name: render(doc) for name, doc in generate().items()}
    present = {p.name for p in directory.glob("*.schema.json")} if directory.is_dir() else set()
    stale = sorted(present - wanted.keys())
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return sorted(stale)


def write(directory: Path = JSON_DIR) -> list[str]:
    """Regenerate every schema file; remove ``*.schema.json`` files no record owns."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {name: render(doc) for name, doc in generate().items()}
    for path in directory.glob("*.schema.json"):
        if path.name not in wanted:
            path.unlink()
    changed = []
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(name)
    return changed


def load(name: str, directory: Path = JSON_DIR) -> dict[str, Any]:
    """A committed schema file, parsed (``load("request")``)."""
    return json.loads((directory / f"{name}.schema.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ validating


def iter_errors(schema: dict[str, Any], instance: Any) -> Iterator[str]:
    """Every way ``instance`` breaks ``schema``, as ``"path: message"`` strings.

    For tests and tools: a thin wrapper over the ``jsonschema`` package (a test extra, not
    a runtime dependency, hence imported here) with its draft 2020-12 validator.
    """
    from jsonschema import Draft202012Validator

    for e in Draft202012Validator(schema).iter_errors(instance):
        yield f"{e.json_path}: {e.message}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.jsonschema", description=__doc__.split("\n\n")[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate schemas/json/")
    group.add_argument("--check", action="store_true", help="exit 1 if files are stale")
    parser.add_argument("--dir", type=Path, default=JSON_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        changed = write(args.dir)
        print(f"wrote {len(changed)} file(s)" + (": " + ", ".join(changed) if changed else ""))
        return 0
    stale = stale_files(args.dir)
    if stale:
        print(
            "stale JSON Schema files (run python -m schemas.jsonschema --write): "
            + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    print("JSON Schema files are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
