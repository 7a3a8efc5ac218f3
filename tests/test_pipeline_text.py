import pytest

import tests.toy_passes  # noqa: F401  registers test passes
from optpipe.errors import UsageError
from optpipe.pipeline_text import PipelineSyntaxError, format_pipeline, parse_pipeline


def roundtrip(s):
    return format_pipeline(parse_pipeline(s))


@pytest.mark.parametrize(
    "text",
    [
        "fuse-attention",
        "fuse-attention,dce",
        "fuse-attention,cse,dce",
        "test-add-noise{scale=0.5}",
        "test-add-noise{scale=0.5,min-sqnr=20.0},dce",
        "fuse-attention,attention{kind=sliding-window,window=256,layers=2:}",
        "attention{kind=block-sparse,layers=[0,11]}",
    ],
)
def test_canonical_strings_round_trip(text):
    assert roundtrip(text) == text


def test_canonical_form_drops_defaults_and_whitespace():
    assert roundtrip(" fuse-attention , test-add-noise{ scale = 0.001 } ") == "fuse-attention,test-add-noise"
    assert roundtrip("test-add-noise{}") == "test-add-noise"


def test_values_are_typed_by_the_config():
    (spec,) = parse_pipeline("test-add-noise{scale=2,min-sqnr=none}")
    assert spec.config.scale == 2.0 and isinstance(spec.config.scale, float)
    assert spec.config.min_sqnr is None


def test_unknown_pass_points_at_it_and_suggests():
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline("dce,fuse-atention")
    assert e.value.column == 4
    assert "unknown pass 'fuse-atention'" in e.value.message
    assert "did you mean 'fuse-attention'" in e.value.hint
    lines = e.value.message.splitlines()
    assert lines[-1].index("^") - 2 == 4  # the caret sits under the bad name


def test_unknown_option_suggests_nearest():
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline("test-add-noise{scal=1}")
    assert "unknown option 'scal'" in e.value.message and "did you mean 'scale'" in e.value.hint
    assert e.value.column == len("test-add-noise{")


def test_bad_option_value():
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline("test-add-noise{scale=lots}")
    assert "expected a number" in e.value.message
    assert e.value.column == len("test-add-noise{scale=")


def test_config_validation_runs():
    with pytest.raises(UsageError, match="scale must be >= 0"):
        parse_pipeline("test-add-noise{scale=-1}")


@pytest.mark.parametrize(
    "text,col",
    [
        ("dce,", 4),
        ("dce{", 4),
        ("dce,,cse", 4),
        ("test-add-noise{scale}", 20),
        ("dce cse", 4),
        ("", 0),
        ("test-add-noise{scale=1,scale=2}", 23),
    ],
)
def test_malformed_pipelines_have_a_caret(text, col):
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline(text)
    assert e.value.column == col, e.value.message
    assert "^" in e.value.message
