"""`LayerSelection`: which of N layers (attention sites, blocks, ...) a pass applies to.

Python's slice and index syntax, over layer indices `0 .. total-1` (negative counts from the end):

    ":"        every layer (the default)
    "2:"       from the third layer on            ":-1"   all but the last
    "1:8:2"    every other layer from 1 to 7      "3"     only layer 3
    "[0,11]"   layers 0 and 11 (a list; items may be slices: "[0,4:6,-1]")

`str()` gives the canonical text, which `parse` reads back (`parse(str(s)) == s`). In the pipeline
language a list must stay in brackets (`attention{layers=[0,11]}`), since a bare comma separates
options; the canonical form of a list is printed quoted.

>>> sel = LayerSelection.parse("2:")
>>> [i for i in range(4) if sel.selects(i, 4)]
[2, 3]
>>> LayerSelection.parse("[0, -1]").indices(12)
[0, 11]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INT = re.compile(r"[+-]?\d+")

# An item is an index (int) or a slice as (start, stop, step), each None when left out (slices are
# not hashable before Python 3.12, and a frozen dataclass must be).


@dataclass(frozen=True)
class LayerSelection:
    items: tuple = ((None, None, None),)
    """Indices and (start, stop, step) slices; a layer is selected when any item selects it."""
    listed: bool = False
    """Written as a bracketed list (kept so that `str` round-trips `[3]` as `[3]`, not `3`)."""

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def all(cls) -> LayerSelection:
        return cls()

    @classmethod
    def parse(cls, text: str) -> LayerSelection:
        """Read `:`, `2:`, `:-1`, `1:8:2`, `3`, `[0,11]` or `0,11`; ValueError says what is wrong."""
        if not isinstance(text, str):
            raise ValueError(f"expected a layer selection string, got {text!r}")
        body = text.strip()
        listed = body.startswith("[") or "," in body
        if body.startswith("["):
            if not body.endswith("]"):
                raise ValueError(f"unclosed '[' in layer selection {text!r}")
            body = body[1:-1]
        parts = [p.strip() for p in body.split(",")]
        if listed and parts == [""]:
            raise ValueError("empty layer list; use ':' for every layer")
        if any(p == "" for p in parts):
            raise ValueError(f"empty item in layer selection {text!r}")
        return cls(tuple(_parse_item(p, text) for p in parts), listed)

    # -- queries -----------------------------------------------------------------------------------
    def selects(self, index: int, total: int) -> bool:
        """Whether layer `index` (0-based, of `total`) is selected."""
        if not 0 <= index < total:
            raise IndexError(f"layer {index} out of range for {total} layers")
        for item in self.items:
            if isinstance(item, int):
                if (item + total if item < 0 else item) == index:
                    return True
            elif index in range(total)[slice(*item)]:
                return True
        return False

    def indices(self, total: int) -> list[int]:
        """The selected layer indices, ascending."""
        return [i for i in range(total) if self.selects(i, total)]

    @property
    def is_all(self) -> bool:
        return self.items == ((None, None, None),) or any(
            not isinstance(it, int) and it[0] in (None, 0) and it[1] is None and it[2] in (None, 1) for it in self.items
        )

    def __str__(self) -> str:
        text = ",".join(_format_item(it) for it in self.items)
        return f"[{text}]" if self.listed else text

    def __repr__(self) -> str:
        return f"LayerSelection.parse({str(self)!r})"


def _parse_item(part: str, text: str):
    if ":" not in part:
        if not _INT.fullmatch(part):
            raise ValueError(
                f"bad layer index {part!r} in {text!r}: expected an integer, a slice "
                "such as 2: or :-1, or a list such as [0,11]"
            )
        return int(part)
    fields = part.split(":")
    if len(fields) > 3:
        raise ValueError(f"bad slice {part!r} in {text!r}: at most start:stop:step")
    values = []
    for f in fields + [""] * (3 - len(fields)):
        f = f.strip()
        if f == "":
            values.append(None)
        elif _INT.fullmatch(f):
            values.append(int(f))
        else:
            raise ValueError(f"bad slice {part!r} in {text!r}: {f!r} is not an integer")
    if values[2] == 0:
        raise ValueError(f"bad slice {part!r} in {text!r}: step cannot be zero")
    return tuple(values)


def _format_item(item) -> str:
    if isinstance(item, int):
        return str(item)
    start, stop, step = item
    text = f"{'' if start is None else start}:{'' if stop is None else stop}"
    return text + (f":{step}" if step is not None else "")


__all__ = ["LayerSelection"]
