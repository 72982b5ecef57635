"""The configuration's JSON schema (shipped in ``data/``): loading it, a validator that
fills in its defaults, and one-line messages for its violations."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jsonschema
import yaml

__all__ = ["coerce_strings", "default_filling_validator", "load_schema", "schema_error_line"]

_INT = re.compile(r"[+-]?\d+")
_BOOL = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def load_schema(name: str = "config") -> dict[str, Any]:
    """The JSON schema shipped with the package (``config`` or ``sheet``)."""
    text = resources.files("histoalign_wsi").joinpath("data", f"{name}.schema.yaml").read_text()
    schema: dict[str, Any] = yaml.safe_load(text)
    return schema


def coerce_strings(instance: Any, schema: Any) -> Any:
    """``instance`` with each string made the number or boolean its schema asks for.
    Snakemake's ``--config`` reads values with YAML's base loader, which keeps every
    scalar a string: ``scales_mpp=[0.5,1.0,2.0]`` arrives as ``["0.5", "1.0", "2.0"]``."""
    if not isinstance(schema, Mapping):
        return instance
    if isinstance(instance, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        other = extra if isinstance(extra, Mapping) else {}
        return {k: coerce_strings(v, props.get(k, other)) for k, v in instance.items()}
    if isinstance(instance, list):
        return [coerce_strings(v, schema.get("items", {})) for v in instance]
    if not isinstance(instance, str):
        return instance
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    text = instance.strip()
    if "string" in kinds or not text:
        return instance
    if ("integer" in kinds or "number" in kinds) and _INT.fullmatch(text):
        return int(text)
    if "number" in kinds:
        try:
            value = float(text)
        except ValueError:
            return instance
        return value if math.isfinite(value) else instance
    if "boolean" in kinds and text.lower() in _BOOL:
        return _BOOL[text.lower()]
    return instance


def default_filling_validator() -> type[jsonschema.protocols.Validator]:
    base = jsonschema.Draft202012Validator

    def set_defaults(validator: Any, properties: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(key, json.loads(json.dumps(sub["default"])))
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def schema_error_line(err: jsonschema.ValidationError) -> str:
    """One line for a schema violation: the key, its value, the rule and what is allowed
    (never the schema itself)."""
    where = ".".join(str(p) for p in err.path) or "(top level)"
    rule = err.validator
    schema = err.schema if isinstance(err.schema, Mapping) else {}
    if rule == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        hints = [
            f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1)) else repr(k)
            for k in extra
        ]
        return f"{where}: unknown key {', '.join(hints)}; allowed keys: {', '.join(allowed)}"
    value = json.dumps(err.instance, ensure_ascii=False)
    value = value if len(value) <= 80 else value[:77] + "..."
    if rule == "enum":
        return f"{where} = {value}: must be one of {', '.join(str(v) for v in schema.get('enum', ()))}"
    if rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "pattern", "type"):
        return f"{where} = {value}: breaks {rule} {json.dumps(err.validator_value)}"
    return f"{where} = {value}: {err.message[:200]}"
