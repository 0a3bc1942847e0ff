"""On-disk key layouts: the same tensors under different prefixes, as transformers versions wrote them.

Tables speak the family's canonical (hub) names. A :class:`KeyLayout` maps file keys to canonical
keys and back by prefix; the layout of a checkpoint is detected from its keys, remembered at
import, and reproduced at export so that a round trip gives back the same key set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vlm_bridge.convert.ops import Entry


@dataclass(frozen=True)
class KeyLayout:
    name: str
    file_to_canonical: dict[str, str] = field(default_factory=dict)
    # For layouts that differ beyond prefixes (inner modules renamed, q/k/v stored fused): the
    # canonical table entry -> this layout's entry; prefixes are then mapped as above.
    rewrite: Callable[[Entry], Entry] | None = None

    def table(self, entries: Iterable[Entry]) -> list[Entry]:
        """The family's canonical weight table as this layout stores it."""
        return [self.rewrite(e) for e in entries] if self.rewrite else list(entries)

    def to_canonical(self, key: str) -> str:
        for src, dst in self.file_to_canonical.items():
            if key.startswith(src):
                return dst + key[len(src):]
        return key

    def to_file(self, key: str) -> str:
        for src, dst in self.file_to_canonical.items():
            if key.startswith(dst):
                return src + key[len(dst):]
        return key

    def matches(self, keys: Iterable[str]) -> bool:
        """True when every prefix this layout renames occurs in the keys (hub: nothing to rename)."""
        keys = list(keys)
        return all(any(k.startswith(src) for k in keys) for src in self.file_to_canonical)


def detect_layout(layouts: list[KeyLayout], keys: Iterable[str],
                  table: Iterable[Entry] | None = None) -> KeyLayout:
    """The layout of a checkpoint's keys.

    With ``table`` (the family's canonical weight table), the layout under which its HF names
    match the file's keys best (fewest missing plus unexpected; the first listed wins a tie): layouts may
    nest prefixes (``vision_tower.`` vs ``vision_tower.vision_model.``), which prefix presence
    alone cannot tell apart. Without it, the most specific layout whose prefixes all occur, else
    the first (hub) layout.
    """
    keys = list(keys)
    if table is not None:
        table, present = list(table), set(keys)

        def mismatches(lay: KeyLayout) -> int:
            return len({lay.to_file(n) for e in lay.table(table) for n in e.hf} ^ present)

        return min(layouts, key=mismatches)
    candidates = [lay for lay in layouts if lay.file_to_canonical and lay.matches(keys)]
    return max(candidates, key=lambda lay: len(lay.file_to_canonical)) if candidates else layouts[0]


def layout_by_name(layouts: list[KeyLayout], name: str) -> KeyLayout:
    for lay in layouts:
        if lay.name == name:
            return lay
    raise ValueError(f"unknown key layout {name!r}; known: {[lay.name for lay in layouts]}")
