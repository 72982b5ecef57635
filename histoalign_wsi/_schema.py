"""The configuration's JSON schema (shipped in ``data/``): loading it, a validator that
fills in its defaults, one-line messages for its violations, and the checks a schema
cannot make (a configuration's expanded size, every number finite)."""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError
from .textfiles import MAX_DEPTH

__all__ = [
    "MAX_VALUES",
    "check_bounded",
    "check_cross_fields",
    "check_finite",
    "coerce_strings",
    "default_filling_validator",
    "load_schema",
    "schema_error_line",
]

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
        if all("did you mean" in h for h in hints):  # the hint is the answer; the list is noise
            return f"{where}: unknown key {', '.join(hints)}"
        listed = ", ".join(allowed)
        listed = listed if len(listed) <= 400 else listed[:397].rsplit(", ", 1)[0] + ", ..."
        return f"{where}: unknown key {', '.join(hints)}; allowed keys: {listed}"
    value = json.dumps(err.instance, ensure_ascii=False)
    value = value if len(value) <= 80 else value[:77] + "..."
    if rule == "enum":
        return f"{where} = {value}: must be one of {', '.join(str(v) for v in schema.get('enum', ()))}"
    if rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "pattern", "type"):
        return f"{where} = {value}: breaks {rule} {json.dumps(err.validator_value)}"
    return f"{where} = {value}: {err.message[:200]}"


#: the most values a configuration may hold once YAML aliases are expanded
MAX_VALUES = 100_000


def check_bounded(raw: Any) -> None:
    """Refuse a configuration that would not fit in memory once expanded (aliases shared
    many times) or nests absurdly deep, before anything copies it."""
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    seen = 0
    while stack:
        node, where, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(
                f"configuration: holds more than {MAX_VALUES:,} values once expanded "
                f"(near {where or 'the top'}); YAML aliases (*name) repeated over and over do this"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"configuration: {where} nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, Mapping):
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]


def check_finite(cfg: Any, where: str = "") -> None:
    """Every number of the configuration is finite (the schema's bounds let NaN and
    infinity through)."""
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            check_finite(v, f"{where}[{i}]")
    elif isinstance(cfg, float) and not math.isfinite(cfg):
        raise ConfigError(f"invalid configuration: {where}: {cfg} is not a finite number")


def check_cross_fields(cfg: Mapping[str, Any]) -> None:
    """The rules between keys: nested scales, the CONCH protocol's limits, weights that
    fit the scales and sum to more than 0."""
    scales = cfg["scales_mpp"]
    if any(b <= a for a, b in itertools.pairwise(scales)):
        raise ConfigError(f"scales_mpp must be strictly ascending, got {scales}")
    for s in scales[1:]:
        ratio = s / scales[0]
        if abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(
                f"scales_mpp: {s} is not an integer multiple of the finest scale {scales[0]}; "
                "nested grids need integer ratios"
            )
    if cfg["protocol"] in ("conch", "keep"):
        _check_conch(cfg, cfg["protocol"])
    sw = cfg["pooling"]["scale_weights"]
    if sw is not None and len(sw) != len(scales):
        raise ConfigError(f"pooling.scale_weights has {len(sw)} entries but scales_mpp has {len(scales)}")
    if sw is not None and sum(sw) <= 0:
        raise ConfigError(f"pooling.scale_weights {sw} sum to 0: give at least one scale a positive weight")
    ew = cfg["encoder_weights"]
    if sum(float(ew.get(e, 1.0)) for e in cfg["encoders"]) <= 0:
        raise ConfigError(
            f"encoder_weights {ew} give every configured encoder weight 0: "
            "give at least one a positive weight"
        )


def _check_conch(cfg: Mapping[str, Any], protocol: str = "conch") -> None:
    """The CONCH and KEEP protocols are one encoder, one magnification, no calibration."""
    if len(cfg["encoders"]) != 1:
        raise ConfigError(
            f"protocol: {protocol} scores with exactly one encoder, got encoders {cfg['encoders']}"
        )
    if cfg["calibration"]:
        raise ConfigError(f"protocol: {protocol} has no calibration; set calibration: false")
    mpp = cfg[protocol]["scale_mpp"]
    if not any(abs(mpp - s) < 1e-9 for s in cfg["scales_mpp"]):
        raise ConfigError(f"{protocol}.scale_mpp: {mpp} is not one of scales_mpp {cfg['scales_mpp']}")
