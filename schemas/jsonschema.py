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
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.fields import FREE_MAX_DEPTH, Field
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
            s["pattern"] = f.pattern
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


# ----------------------------------------------------------------- a minimal validator
# Enough of draft 2020-12 to check instances against the files above without a
# third-party package: exactly the keywords the generator emits. It reads only the JSON
# documents, never the Field specs, so it is an independent check of what other languages
# will see. An unknown keyword is an error, so that the generator cannot outgrow it.

_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description"})
_KEYWORDS = _ANNOTATIONS | {
    "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "items", "maxItems", "properties", "required",
    "additionalProperties", "propertyNames", "maxProperties", "allOf", "if", "then", "else",
}  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _json_type_ok(v: Any, t: str) -> bool:
    if t == "null":
        return v is None
    if t == "boolean":
        return isinstance(v, bool)
    if t == "string":
        return isinstance(v, str)
    if t == "number":
        return _is_number(v)
    if t == "integer":
        return (
            isinstance(v, int)
            and not isinstance(v, bool)
            or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
        )
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    raise ValueError(f"unknown JSON type {t!r}")


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and a == b


def _ecma_search(pattern: str, s: str) -> bool:
    # ECMA-262 "$" matches only at the very end; Python's "$" also before a final "\n".
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + "\\Z"
    return re.search(pattern, s) is not None


def iter_errors(schema: dict[str, Any], instance: Any, path: str = "") -> Iterator[str]:
    """Every way ``instance`` breaks ``schema``, as ``"path: message"`` strings."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{path or '<root>'}: keywords not supported: {sorted(unknown)}")
    where = path or "<root>"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_json_type_ok(instance, t) for t in types):
            yield f"{where}: {instance!r:.60} is not of type {types}"
            return
    if "enum" in schema and not any(_json_equal(instance, e) for e in schema["enum"]):
        yield f"{where}: {instance!r:.60} is not one of {schema['enum']}"
    if "const" in schema and not _json_equal(instance, schema["const"]):
        yield f"{where}: {instance!r:.60} is not {schema['const']!r}"
    if _is_number(instance):
        if "minimum" in schema and not instance >= schema["minimum"]:
            yield f"{where}: {instance!r} < minimum {schema['minimum']}"
        if "maximum" in schema and not instance <= schema["maximum"]:
            yield f"{where}: {instance!r} > maximum {schema['maximum']}"
        if "exclusiveMinimum" in schema and not instance > schema["exclusiveMinimum"]:
            yield f"{where}: {instance!r} <= exclusiveMinimum {schema['exclusiveMinimum']}"
        if "exclusiveMaximum" in schema and not instance < schema["exclusiveMaximum"]:
            yield f"{where}: {instance!r} >= exclusiveMaximum {schema['exclusiveMaximum']}"
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            yield f"{where}: shorter than {schema['minLength']}"
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            yield f"{where}: longer than {schema['maxLength']}"
        if "pattern" in schema and not _ecma_search(schema["pattern"], instance):
            yield f"{where}: {instance!r:.60} does not match {schema['pattern']!r}"
    if isinstance(instance, list):
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            yield f"{where}: more than {schema['maxItems']} items"
        if "items" in schema:
            for i, x in enumerate(instance):
                yield from iter_errors(schema["items"], x, f"{path}[{i}]")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                yield f"{where}: missing required property {name!r}"
        if "maxProperties" in schema and len(instance) > schema["maxProperties"]:
            yield f"{where}: more than {schema['maxProperties']} properties"
        for k, x in instance.items():
            sub = f"{path}.{k}" if path else str(k)
            if "propertyNames" in schema:
                for e in iter_errors(schema["propertyNames"], k, sub):
                    yield f"{e} (property name)"
            if k in props:
                yield from iter_errors(props[k], x, sub)
            elif "additionalProperties" in schema:
                extra = schema["additionalProperties"]
                if extra is False:
                    yield f"{sub}: additional property not allowed"
                elif isinstance(extra, dict):
                    yield from iter_errors(extra, x, sub)
    for sub_schema in schema.get("allOf", []):
        yield from iter_errors(sub_schema, instance, path)
    if "if" in schema:
        holds = not any(True for _ in iter_errors(schema["if"], instance, path))
        branch = schema.get("then") if holds else schema.get("else")
        if branch is not None:
            yield from iter_errors(branch, instance, path)


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
