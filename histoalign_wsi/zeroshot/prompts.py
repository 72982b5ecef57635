"""Prompt bags: YAML files of class names, descriptions (morphology, cause, presentation)
and caption templates; validated on load; expanded into the texts each class is scored by.

Schema::

    templates: [... "{}" ...]   # or "default": the shipped histopathology templates
    classes:
      NAME:
        names: [...]            # the class name and synonyms
        descriptions: {morphology: [...], cause: [...], presentation: [...]}
        color: [r, g, b]        # optional; used by heatmaps, GeoJSON and the report
        conch_names: [...]      # optional; the published class names the conch protocol uses
        other: true             # optional; "other tissue": in tile decisions, never the slide's

Two protocols turn a bag into prompts. ``histoalign`` (the default, richer): every name
crossed with the bag's templates, plus every description as a prompt of its own.
``conch``: CONCH's zero-shot protocol exactly, as published (its all-prompt ensemble;
not MI-Zero's median over 50 sampled prompt sets): ``conch_names``
(the published class-name lists; the bag's names where a bag has none) crossed with
CONCH's 22 templates (``bags/_conch_templates.yaml``), no descriptions.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import PromptBagError
from ..textfiles import read_yaml, strict_yaml
from .names import safe_base

__all__ = ["GROUPS", "PROTOCOLS", "ClassPrompts", "PromptBag", "conch_templates", "list_bags", "load_bag"]

GROUPS = ("morphology", "cause", "presentation")
PROTOCOLS = ("histoalign", "conch", "keep")


@dataclass(frozen=True)
class ClassPrompts:
    name: str
    names: tuple[str, ...]
    descriptions: Mapping[str, tuple[str, ...]]
    color: tuple[int, int, int]
    conch_names: tuple[str, ...] = ()
    #: "other tissue" (normal, stroma, background): scored on every tile, shown on the
    #: heatmaps, but never the slide's prediction
    other: bool = False


@dataclass(frozen=True)
class PromptBag:
    name: str
    classes: tuple[ClassPrompts, ...]
    templates: tuple[str, ...]
    content_hash: str
    ordered: bool = False  # classes in order of grade or severity (quadratic weighted kappa)

    @property
    def class_names(self) -> list[str]:
        """Every class, "other tissue" ones included (the tile decisions)."""
        return [c.name for c in self.classes]

    @property
    def other_classes(self) -> tuple[str, ...]:
        """The classes that take part in tile decisions but never in the slide's."""
        return tuple(c.name for c in self.classes if c.other)

    @property
    def decision_classes(self) -> list[str]:
        """The classes a slide can be predicted as (and labelled with)."""
        return [c.name for c in self.classes if not c.other]

    def colors(self) -> dict[str, tuple[int, int, int]]:
        return {c.name: c.color for c in self.classes}

    def texts(self, *, protocol: str = "histoalign") -> tuple[list[str], list[int], list[str]]:
        """All prompts: (texts, class index of each, group of each), for ``protocol``.

        ``histoalign``: names crossed with every template (group ``name``), and each
        description as a prompt of its own group. ``conch``: the CONCH class names crossed
        with CONCH's templates only. ``keep``: each name with KEEP's template ``"{}."``
        (the prompt sets are combinations of these, :mod:`.keep`).
        """
        if protocol not in PROTOCOLS:
            raise PromptBagError(f"unknown protocol {protocol!r} (choose {', '.join(PROTOCOLS)})")
        conch = protocol == "conch"
        templates = conch_templates() if conch else (("{}.",) if protocol == "keep" else self.templates)
        texts: list[str] = []
        cls: list[int] = []
        groups: list[str] = []
        for k, c in enumerate(self.classes):
            names = (c.conch_names or c.names) if conch else c.names
            for t in templates:
                for n in names:
                    texts.append(t.replace("{}", n))
                    cls.append(k)
                    groups.append("name")
            if protocol == "histoalign":
                for g, items in c.descriptions.items():
                    for d in items:
                        texts.append(d)
                        cls.append(k)
                        groups.append(g)
        return texts, cls, groups


def _shipped_dir() -> Any:
    return resources.files("histoalign_wsi").joinpath("zeroshot", "bags")


def conch_templates() -> tuple[str, ...]:
    """CONCH's 22 zero-shot caption templates (with ``{}`` for the class name)."""
    raw = yaml.safe_load(_shipped_dir().joinpath("_conch_templates.yaml").read_text(encoding="utf-8"))
    return tuple(raw["templates"])


def list_bags() -> list[str]:
    """Names of the shipped prompt bags."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in _shipped_dir().iterdir()
        if p.name.endswith(".yaml") and not p.name.startswith("_")
    )


def _default_color(i: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i / max(n, 1) + 0.02) % 1.0, 0.75, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PromptBagError(f"{where} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _check_class_names(keys: list[Any], bag: str) -> None:
    """Class names are text, not blank, and stay distinct once made file-name safe (a
    heatmap or a column per class); refused in one line otherwise."""
    seen: dict[str, str] = {}
    for k in keys:
        if not isinstance(k, str):
            raise PromptBagError(
                f"prompt bag {bag!r}: class name {k!r} is a {type(k).__name__}, not text; quote it ('{k}':)"
            )
        if not k.strip():
            raise PromptBagError(f"prompt bag {bag!r}: a class name is empty ({k!r})")
        if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in k):
            raise PromptBagError(
                f"prompt bag {bag!r}: class name {k!r} holds a line break or control character; "
                "write it on one line"
            )
        key = safe_base(k).casefold()
        if key in seen:
            raise PromptBagError(
                f"prompt bag {bag!r}: class names {seen[key]!r} and {k!r} differ only in case or "
                f"punctuation (both become {safe_base(k)!r} in file and column names); rename one"
            )
        seen[key] = k


def parse_bag(raw: Any, *, name: str) -> PromptBag:
    """Validate a loaded YAML mapping; errors name the bag and the bad key."""
    if not isinstance(raw, Mapping):
        raise PromptBagError(f"prompt bag {name!r} must be a mapping with 'classes' and 'templates'")
    unknown = set(raw) - {"classes", "templates", "description", "ordered"}
    if unknown:
        raise PromptBagError(f"prompt bag {name!r}: unknown keys {sorted(unknown)}")
    tmpl = raw.get("templates", "default")
    if tmpl == "default":
        shipped = yaml.safe_load(_shipped_dir().joinpath("_templates.yaml").read_text())
        tmpl = shipped["templates"]
    templates = _strings(tmpl, f"prompt bag {name!r}: templates")
    for t in templates:
        if t.count("{}") != 1:
            raise PromptBagError(f"prompt bag {name!r}: template {t!r} must contain exactly one '{{}}'")
    classes_raw = raw.get("classes")
    if not isinstance(classes_raw, Mapping) or len(classes_raw) < 2:
        raise PromptBagError(f"prompt bag {name!r}: 'classes' must map at least two class names")
    _check_class_names(list(classes_raw), name)
    classes = []
    for i, (cname, c) in enumerate(classes_raw.items()):
        where = f"prompt bag {name!r}: classes.{cname}"
        if not isinstance(c, Mapping):
            raise PromptBagError(f"{where} must be a mapping with 'names'")
        bad = set(c) - {"names", "descriptions", "color", "conch_names", "other"}
        if bad:
            raise PromptBagError(f"{where}: unknown keys {sorted(bad)}")
        if not c.get("names"):
            raise PromptBagError(f"{where}.names: the class has no prompts (give at least one name)")
        names = _strings(c["names"], f"{where}.names")
        desc_raw = c.get("descriptions") or {}
        if not isinstance(desc_raw, Mapping):
            raise PromptBagError(f"{where}.descriptions must be a mapping of {', '.join(GROUPS)}")
        descs = {}
        for g, items in desc_raw.items():
            if g not in GROUPS:
                raise PromptBagError(f"{where}.descriptions.{g}: unknown group (use {', '.join(GROUPS)})")
            descs[g] = _strings(items, f"{where}.descriptions.{g}")
        color = c.get("color")
        if color is None:
            col = _default_color(i, len(classes_raw))
        else:
            if not (
                isinstance(color, list)
                and len(color) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
            ):
                raise PromptBagError(f"{where}.color must be three integers 0-255")
            col = (color[0], color[1], color[2])
        conch = _strings(c["conch_names"], f"{where}.conch_names") if "conch_names" in c else ()
        other = c.get("other", False)
        if not isinstance(other, bool):
            raise PromptBagError(f"{where}.other must be true or false, got {other!r}")
        classes.append(ClassPrompts(str(cname), names, descs, col, conch, other))
    if sum(not c.other for c in classes) < 2:
        raise PromptBagError(
            f"prompt bag {name!r}: a slide needs two classes it can be predicted as; "
            f"{sum(not c.other for c in classes)} are not marked other"
        )
    ordered = raw.get("ordered", False)
    if not isinstance(ordered, bool):
        raise PromptBagError(f"prompt bag {name!r}: ordered must be true or false, got {ordered!r}")
    canon = json.dumps(
        {
            "templates": templates,
            "classes": [[c.name, c.names, dict(c.descriptions), c.conch_names] for c in classes],
        }
        | ({"ordered": True} if ordered else {})  # an unordered bag keeps its hash
        | ({"other": [c.name for c in classes if c.other]} if any(c.other for c in classes) else {}),
        sort_keys=True,
    )
    return PromptBag(
        name=name,
        classes=tuple(classes),
        templates=templates,
        content_hash=hashlib.sha256(canon.encode()).hexdigest()[:16],
        ordered=ordered,
    )


def load_bag(name_or_path: str | Path) -> PromptBag:
    """A shipped bag by name (see :func:`list_bags`) or a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        raw = read_yaml(p, what="prompt bag file", error=PromptBagError)
        return parse_bag(raw, name=p.stem)
    name = str(name_or_path)
    if name not in list_bags():
        raise PromptBagError(
            f"unknown prompt bag {name!r}; shipped bags: {', '.join(list_bags())}, or give a YAML path"
        )
    raw = strict_yaml(_shipped_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    return parse_bag(raw, name=name)
