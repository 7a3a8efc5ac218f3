"""LayerSelection: parse, select, print (round trip), errors, and use as a pipeline option type."""

import pytest

from optpipe.pipeline_text import convert_value, format_value
from optpipe.selection import LayerSelection


@pytest.mark.parametrize(
    "text, total, expected",
    [
        (":", 4, [0, 1, 2, 3]),
        ("2:", 4, [2, 3]),
        (":-1", 4, [0, 1, 2]),
        ("1:-1", 5, [1, 2, 3]),
        ("::2", 5, [0, 2, 4]),
        ("1:8:2", 12, [1, 3, 5, 7]),
        ("3", 12, [3]),
        ("-1", 12, [11]),
        ("[0,11]", 12, [0, 11]),
        ("0,11", 12, [0, 11]),
        ("[0, 4:6, -1]", 12, [0, 4, 5, 11]),
        ("[20]", 12, []),
        ("5:", 3, []),
    ],
)
def test_selects(text, total, expected):
    sel = LayerSelection.parse(text)
    assert sel.indices(total) == expected
    assert [i for i in range(total) if sel.selects(i, total)] == expected


@pytest.mark.parametrize(
    "text, canonical",
    [
        (":", ":"),
        ("2:", "2:"),
        (":-1", ":-1"),
        ("1:8:2", "1:8:2"),
        ("3", "3"),
        ("-1", "-1"),
        ("[0,11]", "[0,11]"),
        ("0,11", "[0,11]"),
        ("[0, 4:6, -1]", "[0,4:6,-1]"),
        ("[3]", "[3]"),
    ],
)
def test_str_round_trips(text, canonical):
    sel = LayerSelection.parse(text)
    assert str(sel) == canonical
    assert LayerSelection.parse(str(sel)) == sel


@pytest.mark.parametrize("bad", ["", "a", "1:2:3:4", "[1,", "[]", "1::0", "[1,,2]", "x:2"])
def test_errors_say_what_is_wrong(bad):
    with pytest.raises(ValueError) as e:
        LayerSelection.parse(bad)
    assert str(e.value)


def test_default_selects_everything_and_is_hashable():
    assert LayerSelection().is_all and LayerSelection.all() == LayerSelection.parse(":")
    assert not LayerSelection.parse("1:").is_all
    assert len({LayerSelection.parse("2:"), LayerSelection.parse("2:")}) == 1
    with pytest.raises(IndexError):
        LayerSelection().selects(4, 4)


def test_pipeline_option_type_round_trips():
    # the pipeline language converts through `parse` and prints with `str` (lists stay bracketed)
    assert convert_value("2:", LayerSelection) == LayerSelection.parse("2:")
    for text in ("2:", ":-1", "[0,11]"):
        value = convert_value(text, LayerSelection)
        printed = format_value(value)
        assert convert_value(printed.strip('"'), LayerSelection) == value
