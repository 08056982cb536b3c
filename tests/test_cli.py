"""The everyday commands that need no training run: `fishds --version`, `fishds train --help` (the config's
sections and where the reference is) and `fishds config-schema` (a JSON schema that validates the shipped
configs and rejects a misspelt key)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fishds.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def test_version(capsys):
    from fishds import __version__

    rc, out = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"fishds {__version__}"


def test_train_help_lists_the_sections_and_points_to_the_reference(capsys):
    rc, out = _run(capsys, "train", "--help")
    assert rc == 0
    for section in ("model:", "peft:", "quant:", "fish:", "data:", "train:"):
        assert f"\n  {section}" in out, section
    assert "keep_ratio" in out and "micro_batch_size" in out and "output_dir" in out
    assert "docs/configuration.md" in out
    assert (ROOT / "docs" / "configuration.md").is_file()


def _check(schema: dict, value, root: dict, where: str) -> list[str]:
    """A structural JSON-schema check of the keywords pydantic emits ($ref, anyOf, type, enum, const, properties,
    additionalProperties, required, items); used when the jsonschema package is not installed."""
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        return _check(root["$defs"][name], value, root, where)
    if "anyOf" in schema:
        options = [_check(s, value, root, where) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{where}: no alternative of anyOf fits {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: {value!r} != {schema['const']!r}"]
    types = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
        "integer": int,
        "number": (int, float),
    }
    kind = schema.get("type")
    if kind:
        ok = isinstance(value, types[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{where}: {value!r} is not {kind}"]
    errors = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: required key {key} missing")
        for key, item in value.items():
            if key in props:
                errors += _check(props[key], item, root, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unknown key {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _check(schema["additionalProperties"], item, root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _check(schema["items"], item, root, f"{where}[{i}]")
    return errors


def _validate(schema: dict, tree: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # not in requirements: the structural check above
        return _check(schema, tree, schema, "config")
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(tree)]


def test_config_schema_validates_the_shipped_configs(capsys):
    rc, out = _run(capsys, "config-schema")
    assert rc == 0
    schema = json.loads(out)
    assert set(schema["properties"]) >= {"model", "peft", "quant", "fish", "data", "train", "output_dir"}
    configs = [ROOT / "configs" / "demo.yaml", *sorted((ROOT / "configs").glob("*/*.yaml"))]
    for path in configs:
        assert _validate(schema, yaml.safe_load(path.read_text())) == [], path
    # and it is a check: a misspelt key, a wrong type and a choice that does not exist are caught
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    bad = {**demo, "fish": {**demo["fish"], "keep_ration": 0.1}}
    assert any("keep_ration" in e for e in _validate(schema, bad))
    bad = {**demo, "train": {**demo["train"], "max_steps": "many"}}
    assert _validate(schema, bad)
    bad = {**demo, "data": {**demo["data"], "format": "alpacca"}}
    assert _validate(schema, bad)
    bad = {k: v for k, v in demo.items() if k != "output_dir"}
    assert any("output_dir" in e for e in _validate(schema, bad))
