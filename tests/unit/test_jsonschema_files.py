"""schemas/json/*.schema.json: committed == generated, and they agree with from_dict.

The files are checked with the ``jsonschema`` package (draft 2020-12), which reads only
the JSON documents, never the Field specs: an independent check of what other languages
will see. Its "pattern" uses Python's ``re``; the generated patterns are written so that
ECMA-262 engines give the same verdicts (see ``_pattern_schema`` in schemas/jsonschema.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from schemas import RECORD_CLASSES, Record, SchemaError
from schemas.examples import example, minimal
from schemas.fields import Field
from schemas.jsonschema import (
    DRAFT,
    JSON_DIR,
    generate,
    load,
    main,
    render,
    stale_files,
    write,
)

NAMES = [c.NAME for c in RECORD_CLASSES]

# What JSON Schema cannot express; the files say so in "$comment".
PYTHON_ONLY = ("larger than", "nested deeper", "must be <= count", "must be > issued_at",
               "must be >= onset", "lone surrogate", "64-bit range")  # fmt: skip


def test_committed_files_equal_generated() -> None:
    assert stale_files() == [], "run: python -m schemas.jsonschema --write"
    assert sorted(p.name for p in JSON_DIR.glob("*.schema.json")) == sorted(
        f"{n}.schema.json" for n in NAMES
    )


@pytest.mark.parametrize("name", NAMES)
def test_file_shape(name: str) -> None:
    text = (JSON_DIR / f"{name}.schema.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    assert doc["$schema"] == DRAFT == "https://json-schema.org/draft/2020-12/schema"
    assert doc["type"] == "object"
    assert doc["additionalProperties"] is False
    assert text.isascii() and text.endswith("}\n")
    assert render(doc) == text


def _all_objects(schema: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(schema, dict):
        if "properties" in schema:
            found.append(schema)
        for v in schema.values():
            found += _all_objects(v)
    elif isinstance(schema, list):
        for v in schema:
            found += _all_objects(v)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_every_fixed_object_is_closed(name: str) -> None:
    for obj in _all_objects(load(name)):
        if "type" in obj or "additionalProperties" in obj:  # not an if/then fragment
            assert obj["additionalProperties"] is False


def test_cli_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0
    (tmp_path / "stale.schema.json").write_text("{}")
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    assert main(["--write", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(generate())
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    assert write(tmp_path) == []  # idempotent
    capsys.readouterr()


# ------------------------------------------------------------------- examples


_VALIDATORS: dict[str, Draft202012Validator] = {}


def _validator(name: str) -> Draft202012Validator:
    if name not in _VALIDATORS:
        _VALIDATORS[name] = Draft202012Validator(load(name))
    return _VALIDATORS[name]


def _file_ok(name: str, instance: Any) -> bool:
    return bool(_validator(name).is_valid(instance))


@pytest.mark.parametrize("name", NAMES)
def test_files_are_valid_draft_2020_12_schemas(name: str) -> None:
    Draft202012Validator.check_schema(load(name))


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_valid_against_files(name: str) -> None:
    assert list(_validator(name).iter_errors(example(name))) == []
    assert list(_validator(name).iter_errors(minimal(name))) == []
    assert not _file_ok(name, example(name) | {"bogus": 1})


def _with_pattern(schema: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(schema, dict):
        if "pattern" in schema:
            found.append(schema)
        for v in schema.values():
            found += _with_pattern(v)
    elif isinstance(schema, list):
        for v in schema:
            found += _with_pattern(v)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_patterns_do_not_rely_on_dollar(name: str) -> None:
    """Python's "$" also matches before a final "\\n", ECMA-262's does not: every
    ``^...$`` pattern comes with ``not: {pattern: "\\n"}``; the rest are unanchored."""
    for s in _with_pattern(load(name)):
        if s["pattern"].endswith("$"):
            assert s.get("not") == {"type": "string", "pattern": "\\n"}, s["pattern"]
        else:
            assert not s["pattern"].startswith("^"), s["pattern"]


# ------------------------------------------- agreement on values derived from specs


def _candidates(f: Field) -> list[Any]:
    """Boundary and wrong-kind values for one field, from its declared limits."""
    vals: list[Any] = [None, True, False, 0, -1, 1.5, "", "a", [], {}, [1], {"a": 1}]
    for b in (f.minimum, f.maximum, f.exclusive_minimum, f.exclusive_maximum):
        if b is not None:
            vals += [b, b - 1, b + 1, b - 1e-3, b + 1e-3, float(b)]
    if f.max_length is not None:
        vals += ["x" * f.max_length, "x" * (f.max_length + 1), "a b", "a\nb", "é" * f.max_length,
                 "a\n", "\n", "a\r\n", "a\u2028", "a\u0085"]  # fmt: skip
    if f.min_length:
        vals += ["x" * (f.min_length - 1), "x" * f.min_length]
    if f.enum is not None:
        vals += [*f.enum, f.enum[0].upper(), f.enum[0] + "\n"]
    if f.type == "array" and f.max_items is not None:
        vals += [["a"] * f.max_items, ["a"] * (f.max_items + 1), ["a", "b c"], [1]]
    if f.values is not None and f.max_properties is not None:
        vals += [{str(i): 1 for i in range(f.max_properties)},
                 {str(i): 1 for i in range(f.max_properties + 1)},
                 {"1": -1}, {"": 1}, {"a b": 1}, {"01": 1}, {"1": 1.5}, {"1": 0}]  # fmt: skip
    return vals


def _paths(cls: type[Record]) -> list[tuple[str, Field]]:
    out = []
    for f in cls.SPEC.props or ():
        out.append((f.name, f))
        for sub in f.props or ():
            out.append((f"{f.name}.{sub.name}", sub))
    return out


def _agreement_params() -> list[Any]:
    return [
        pytest.param(cls, path, f, id=f"{cls.NAME}.{path}")
        for cls in RECORD_CLASSES
        for path, f in _paths(cls)
    ]


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    target = obj
    for p in parents:
        target = target[p]
    target[last] = value
    return obj


def _check_agreement(cls: type[Record], obj: Any) -> None:
    try:
        as_json = orjson.loads(orjson.dumps(obj))
    except (TypeError, orjson.JSONEncodeError):
        return  # not representable as JSON: nothing for the file to say
    if as_json != obj or _non_finite(obj):
        return
    in_file = _file_ok(cls.NAME, as_json)
    try:
        cls.from_dict(as_json)
        python = True
        reason = ""
    except SchemaError as e:
        python = False
        reason = e.reason
    if not python and any(p in reason for p in PYTHON_ONLY):
        return
    assert in_file == python, (
        f"file says {'valid' if in_file else 'invalid'}, from_dict says "
        f"{'valid' if python else 'invalid: ' + reason} for {as_json!r:.300}"
    )


def _non_finite(v: Any) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_non_finite(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_non_finite(x) for x in v)
    return False


@pytest.mark.parametrize(("cls", "path", "f"), _agreement_params())
def test_file_and_validator_agree_on_boundaries(cls: type[Record], path: str, f: Field) -> None:
    for value in _candidates(f):
        _check_agreement(cls, _with(example(cls.NAME), path, value))
        base = minimal(cls.NAME)
        if "." not in path:
            _check_agreement(cls, _with(base, path, value))


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_file_and_validator_agree_on_missing_and_unknown(cls: type[Record]) -> None:
    for f in cls.SPEC.props or ():
        obj = example(cls.NAME)
        del obj[f.name]
        _check_agreement(cls, obj)
    _check_agreement(cls, example(cls.NAME) | {"bogus": 1})


def _with_newline(v: Any) -> list[Any]:
    """Copies of ``v`` with "\\n" appended to one string in it (a value or a key)."""
    if isinstance(v, str):
        return [v + "\\n"]
    out: list[Any] = []
    if isinstance(v, list):
        for i, x in enumerate(v):
            out += [[*v[:i], y, *v[i + 1 :]] for y in _with_newline(x)]
    elif isinstance(v, dict):
        for k, x in v.items():
            out += [{**v, k: y} for y in _with_newline(x)]
            out.append({(k + "\\n" if j == k else j): z for j, z in v.items()})
    return out


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.NAME)
def test_file_and_validator_agree_on_trailing_newlines(cls: type[Record]) -> None:
    # where Python's "$" and ECMA-262's differ: "x\\n" must not pass a ^...$ pattern
    for obj in (example(cls.NAME), minimal(cls.NAME)):
        for changed in _with_newline(obj):
            _check_agreement(cls, changed)


# ------------------------------------------------------- agreement, property-based

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[type[Record], dict[str, Any]]:
    cls = draw(st.sampled_from(RECORD_CLASSES))
    obj = example(cls.NAME) if draw(st.booleans()) else minimal(cls.NAME)
    paths = _paths(cls)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path, f = draw(st.sampled_from(paths))
        if "." in path and not isinstance(obj.get(path.split(".")[0]), dict):
            continue
        value = draw(st.one_of(json_values, st.sampled_from(_candidates(f))))
        if draw(st.integers(0, 9)) == 0:
            holder = obj
            parts = path.split(".")
            for p in parts[:-1]:
                holder = holder[p]
            holder.pop(parts[-1], None)
        else:
            _with(obj, path, value)
    return cls, obj


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_file_and_validator_agree_on_random_mutations(case: tuple[type[Record], Any]) -> None:
    cls, obj = case
    _check_agreement(cls, obj)
