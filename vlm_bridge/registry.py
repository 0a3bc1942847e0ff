"""Family lookup by HF ``architectures`` / ``model_type`` (a registry, not if/else).

Families are discovered: every package ``vlm_bridge/families/<name>/`` (not starting with ``_``)
that exports ``FAMILIES`` is registered, in name order. Adding a family adds its folder only.
"""

from __future__ import annotations

import importlib
import pkgutil

from vlm_bridge import families as _families_pkg
from vlm_bridge.families.base import Family, ForeignForm


def _discover() -> list[Family]:
    found: list[Family] = []
    for info in sorted(pkgutil.iter_modules(_families_pkg.__path__), key=lambda i: i.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_families_pkg.__name__}.{info.name}")
        found.extend(getattr(module, "FAMILIES", []))
    names = [f.name for f in found]
    assert len(names) == len(set(names)), f"two families share a name: {names}"
    return found


FAMILIES: list[Family] = _discover()


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in (*f.architectures, *f.foreign_forms))


def family_for_config(hf_config) -> Family:
    """The family for an HF config; a one-line error listing what is supported otherwise."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        known = (*family.architectures, *family.foreign_forms)
        if any(a in known for a in archs) or model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported architecture {archs or model_type!r}; supported: "
        + ", ".join(supported_architectures())
    )


def foreign_form(raw_config: dict) -> ForeignForm | None:
    """The foreign form (see :class:`ForeignForm`) a raw ``config.json`` declares, if any."""
    for family in FAMILIES:
        for arch in raw_config.get("architectures") or ():
            if arch in family.foreign_forms:
                return family.foreign_forms[arch]
    return None


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; known: {[f.name for f in FAMILIES]}")
