"""Property-based tests (hypothesis): the pipeline language and the loaders never fail but in one line.

- printing a pipeline and parsing it back gives the same passes and options (print∘parse round-trips);
- arbitrary text given as a pipeline or an `--input` raises nothing but `UsageError`;
- arbitrary bytes, truncated or bit-flipped archives given as a model or an OUT folder's files raise
  nothing but `UsageError` (a one-line message naming the file), never an internal error.

Examples are few (CI time is tight) and not timed: `deadline=None`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import typing
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

import tests.toy_passes  # noqa: E402, F401  (test-add-noise: a lossy pass with a float option)
from optpipe.errors import UsageError  # noqa: E402
from optpipe.inputs import parse_input_arg  # noqa: E402
from optpipe.loading import load_model  # noqa: E402
from optpipe.outdir import check_manifest  # noqa: E402
from optpipe.pipeline_text import format_pipeline, parse_pipeline  # noqa: E402
from optpipe.registry import config_fields, get_pass, pass_names  # noqa: E402

# hypothesis' caches go under .cache/ (ignored by git), not into a .hypothesis/ in the tree.
set_hypothesis_home_dir(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "hypothesis")
)
# Reproducible in CI (derandomize, no example database left in the tree); OPTPIPE_PROPERTY_SCALE=20
# searches twenty times longer, for a fuzzing session.
SCALE = int(os.environ.get("OPTPIPE_PROPERTY_SCALE", "1"))
COMMON = dict(deadline=None, database=None, derandomize=SCALE == 1, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=40 * SCALE, **COMMON)
SLOW = settings(max_examples=12 * SCALE, **COMMON)
WORD = st.from_regex(r"[a-z_*][a-z0-9_.*]{0,8}", fullmatch=True)


# -- the pipeline language -----------------------------------------------------------------------------
def _value_strategy(tp):
    """Values of an option of type `tp`, or None when the type is not drawn (left at its default)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and "UnionType" in str(origin)):
        inner = [s for s in (_value_strategy(a) for a in args if a is not type(None)) if s is not None]
        return st.one_of(st.none(), *inner) if inner else None
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is tuple and args and args[0] is str:
        return st.lists(WORD, max_size=3).map(tuple)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(0, 4096)
    if tp is float:
        return st.floats(0, 1e4, allow_nan=False).map(lambda x: round(x, 3))
    return None


@st.composite
def pass_specs(draw):
    """(name, config) of a registered pass with some options drawn; configs that validate only."""
    name = draw(st.sampled_from(pass_names()))
    info = get_pass(name)
    types = typing.get_type_hints(info.config_cls)
    kwargs = {}
    for f in config_fields(info.config_cls):
        strategy = _value_strategy(types[f.name])
        if strategy is not None and draw(st.booleans()):
            kwargs[f.name] = draw(strategy)
    try:
        return name, info.config_cls(**kwargs)
    except (ValueError, TypeError):
        assume(False)


@FAST
@given(st.lists(pass_specs(), min_size=1, max_size=3))
def test_print_parse_round_trips(specs):
    from optpipe.pipeline_text import PassSpec

    text = format_pipeline([PassSpec(get_pass(n), c) for n, c in specs])
    parsed = parse_pipeline(text)
    assert [p.name for p in parsed] == [n for n, _ in specs]
    assert [p.config for p in parsed] == [c for _, c in specs], text
    assert format_pipeline(parsed) == text


PIPELINE_ALPHABET = st.sampled_from(list("{}[],=:-_.'\" \n") + ["dce", "cse", "quantize", "skip", "1", "x", "é"])


@FAST
@given(st.one_of(st.text(max_size=40), st.lists(PIPELINE_ALPHABET, max_size=20).map("".join)))
def test_any_pipeline_text_parses_or_raises_usage_error(text):
    try:
        specs = parse_pipeline(text)
    except UsageError as e:
        assert e.one_line()
        return
    assert format_pipeline(specs) == format_pipeline(parse_pipeline(format_pipeline(specs)))


INPUT_ALPHABET = st.sampled_from(list('[]{},=:@-.0123456789 "') + ["input_ids", "int64", "float", "true", "null"])


@FAST
@given(st.one_of(st.text(max_size=30), st.lists(INPUT_ALPHABET, max_size=14).map("".join)))
def test_any_input_text_parses_or_raises_usage_error(text):
    try:
        parse_input_arg(text, default_dtype=torch.int64)
    except UsageError as e:
        assert e.one_line()


# -- the loaders -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory) -> bytes:
    """A small torch.export archive (a linear layer)."""
    path = tmp_path_factory.mktemp("arch") / "model.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),)), str(path))
    return path.read_bytes()


def _load_bytes(data: bytes, name: str = "model.pt2") -> None:
    folder = tempfile.mkdtemp()
    try:
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        load_model(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@SLOW
@given(
    st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b),  # a zip's magic, then anything
        st.binary(max_size=64).map(lambda b: b"\x80\x02" + b),  # a pickle's
        st.binary(max_size=64).map(lambda b: (16).to_bytes(8, "little") + b"{" + b),  # a safetensors header's
    ),
    st.sampled_from(["model.pt2", "model.pt", "model.safetensors"]),
)
def test_arbitrary_bytes_load_or_raise_usage_error(data, name):
    try:
        _load_bytes(data, name)
    except UsageError as e:
        assert name in e.one_line()


@SLOW
@given(data=st.data())
def test_truncated_or_flipped_archives_raise_usage_error(archive_bytes, data):
    cut = data.draw(st.integers(0, len(archive_bytes) - 1), label="cut")
    damaged = archive_bytes[:cut]
    if data.draw(st.booleans(), label="flip instead"):
        at = data.draw(st.integers(0, len(archive_bytes) - 1), label="at")
        damaged = archive_bytes[:at] + bytes([archive_bytes[at] ^ 0xFF]) + archive_bytes[at + 1 :]
    try:
        _load_bytes(damaged)
    except UsageError as e:
        assert "model.pt2" in e.one_line()


@FAST
@given(st.binary(max_size=200))
def test_any_manifest_bytes_check_or_raise_usage_error(data):
    folder = Path(tempfile.mkdtemp())
    try:
        (folder / "manifest.json").write_bytes(data)
        (folder / "program.pt2").write_bytes(b"x")
        check_manifest(str(folder))
    except UsageError as e:
        assert "manifest.json" in e.one_line() or "program.pt2" in e.one_line()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_strategies_draw_from_every_option_type():
    """Guards the round-trip test against silently drawing nothing: most options are drawn."""
    drawn = skipped = 0
    for name in pass_names():
        info = get_pass(name)
        types = typing.get_type_hints(info.config_cls)
        for f in dataclasses.fields(info.config_cls):
            if f.init:
                drawn, skipped = (
                    (drawn + 1, skipped) if _value_strategy(types[f.name]) is not None else (drawn, skipped + 1)
                )
    assert drawn > 2 * skipped


def test_a_damaged_zip_directory_is_a_usage_error(archive_bytes):
    """Bytes flipped in the zip's central directory make zipfile raise UnicodeDecodeError or
    NotImplementedError, not BadZipFile (found by the test above): still one line."""
    import io
    import zipfile

    start = archive_bytes.index(b"PK\x01\x02")
    found = 0
    for at in range(start, len(archive_bytes)):
        damaged = archive_bytes[:at] + bytes([archive_bytes[at] ^ 0xFF]) + archive_bytes[at + 1 :]
        try:
            zipfile.ZipFile(io.BytesIO(damaged)).namelist()
            continue
        except zipfile.BadZipFile:
            continue
        except (ValueError, NotImplementedError):
            found += 1
        with pytest.raises(UsageError, match="corrupt archive"):
            _load_bytes(damaged)
        if found >= 20:
            break
    assert found
