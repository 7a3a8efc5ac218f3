"""The --input language: specs (`name:dtype[dims]`), values (`name=@file.pt`, `name=[[1,2]]`) and
the example tensors made from specs."""

import pytest
import torch

from optpipe.errors import UsageError
from optpipe.inputs import (
    InputSpec,
    InputValue,
    check_specs,
    dynamic_shapes_of,
    is_value_form,
    make_example_inputs,
    parse_input_arg,
    parse_input_spec,
    parse_input_value,
)

# -- specs -----------------------------------------------------------------------------------------


def test_static_spec():
    spec = parse_input_spec("input_ids:int64[1,128]")
    assert spec == InputSpec("input_ids", torch.int64, (1, 128), {})


def test_named_dims_are_dynamic():
    spec = parse_input_spec(" input_ids : int64[batch=1, seq=128] ")
    assert spec.shape == (1, 128)
    assert spec.dynamic == {0: "batch", 1: "seq"}


def test_mixed_named_and_plain_dims():
    spec = parse_input_spec("x:float32[batch=2,16,64]")
    assert spec.shape == (2, 16, 64) and spec.dynamic == {0: "batch"}


@pytest.mark.parametrize(
    "text, dtype",
    [
        ("a:int64[1]", torch.int64),
        ("a:long[1]", torch.int64),
        ("a:int32[1]", torch.int32),
        ("a:int[1]", torch.int32),
        ("a:float32[1]", torch.float32),
        ("a:float[1]", torch.float32),
        ("a:float16[1]", torch.float16),
        ("a:half[1]", torch.float16),
        ("a:bfloat16[1]", torch.bfloat16),
        ("a:bool[1]", torch.bool),
        ("a:INT64[1]", torch.int64),
    ],
)
def test_dtypes_and_aliases(text, dtype):
    assert parse_input_spec(text).dtype == dtype


def test_scalar_spec():
    assert parse_input_spec("temperature:float32[]").shape == ()


@pytest.mark.parametrize(
    "text", ["input_ids:int64[1,128]", "input_ids:int64[batch=1,seq=128]", "x:bfloat16[batch=2,3]", "t:float32[]"]
)
def test_spec_round_trips_through_str(text):
    assert str(parse_input_spec(text)) == text


@pytest.mark.parametrize(
    "text, problem",
    [
        ("input_ids", "missing ':dtype'"),
        ("input_ids:int64", "missing the shape"),
        ("input_ids:int64[1,128", "must end with ']'"),
        ("input_ids:int65[1,128]", "unknown dtype 'int65'"),
        ("input_ids:int64[batch,seq=128]", "dim 'batch' needs a size"),
        ("input_ids:int64[1,,128]", "bad dim ''"),
        ("input_ids:int64[1,-1]", "bad dim '-1'"),
        ("input_ids:int64[s=1,s=2]", "'s' used twice"),
        ("9ids:int64[1]", "bad input name '9ids'"),
        ("", "empty"),
    ],
)
def test_bad_specs_say_what_and_the_form(text, problem):
    with pytest.raises(UsageError) as info:
        parse_input_spec(text)
    line = info.value.one_line()
    assert "\n" not in line
    assert problem in line and repr(text) in line
    assert "name:dtype[dims]" in line  # the expected form


def test_check_specs_rejects_duplicates_and_conflicting_dim_sizes():
    ids = parse_input_spec("input_ids:int64[batch=1,seq=8]")
    check_specs([ids, parse_input_spec("attention_mask:int64[batch=1,seq=8]")])
    with pytest.raises(UsageError, match="given twice"):
        check_specs([ids, ids])
    with pytest.raises(UsageError, match="'seq' is 8 in 'input_ids' but 9 in 'attention_mask'"):
        check_specs([ids, parse_input_spec("attention_mask:int64[batch=1,seq=9]")])


def test_dynamic_shapes_of():
    specs = [parse_input_spec("a:int64[batch=1,seq=8]"), parse_input_spec("b:float32[4]")]
    assert dynamic_shapes_of(specs) == [{0: "batch", 1: "seq"}, None]


# -- example inputs --------------------------------------------------------------------------------


def test_make_example_inputs_kinds():
    specs = [
        parse_input_spec(t)
        for t in (
            "input_ids:int64[2,64]",
            "attention_mask:int64[2,64]",
            "token_type_ids:int64[2,64]",
            "position_ids:int32[2,64]",
            "hidden:float16[2,3]",
            "flags:bool[5]",
            "pad_mask:bool[2]",
        )
    ]
    x = make_example_inputs(specs, vocab_size=10)
    assert list(x) == [s.name for s in specs]
    assert all(x[s.name].dtype == s.dtype and tuple(x[s.name].shape) == s.shape for s in specs)
    assert x["input_ids"].min() >= 0 and x["input_ids"].max() < 10 and x["input_ids"].unique().numel() > 1
    assert bool((x["attention_mask"] == 1).all()) and bool(x["pad_mask"].all())
    assert bool((x["token_type_ids"] == 0).all())
    assert x["position_ids"][1].tolist() == list(range(64))


def test_make_example_inputs_without_vocab_stays_in_any_embedding():
    x = make_example_inputs([parse_input_spec("ids:int64[4,32]")])
    assert x["ids"].max() < 2


def test_make_example_inputs_is_reproducible_by_seed():
    specs = [parse_input_spec("ids:int64[1,16]"), parse_input_spec("h:float32[3]")]
    a, b = make_example_inputs(specs, vocab_size=100), make_example_inputs(specs, vocab_size=100)
    c = make_example_inputs(specs, vocab_size=100, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["h"], c["h"])


def test_make_example_inputs_checks_specs():
    with pytest.raises(UsageError, match="'seq' is 2 in 'a' but 3 in 'b'"):
        make_example_inputs([parse_input_spec("a:int64[seq=2]"), parse_input_spec("b:int64[seq=3]")])


# -- values (`optpipe run`) ------------------------------------------------------------------------


def test_value_from_json_infers_dtype():
    name, x = parse_input_value("input_ids=[[1,2,3]]")
    assert name == "input_ids" and x.dtype == torch.int64 and x.tolist() == [[1, 2, 3]]
    assert parse_input_value("h=[0.5, 1]").tensor.dtype == torch.float32
    assert parse_input_value("m=[true, false]").tensor.dtype == torch.bool


def test_value_dtype_given_or_defaulted():
    assert parse_input_value("ids:int32=[[1,2]]").tensor.dtype == torch.int32
    assert parse_input_value("ids=[[1,2]]", default_dtype=torch.int32).tensor.dtype == torch.int32
    # A dtype written on the command line wins over the default.
    assert parse_input_value("h:half=[1]", default_dtype=torch.float32).tensor.dtype == torch.float16


def test_value_from_file(tmp_path):
    path = tmp_path / "ids.pt"
    torch.save(torch.arange(6).view(2, 3), path)
    value = parse_input_value(f"input_ids=@{path}")
    assert isinstance(value, InputValue)
    assert value.tensor.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert parse_input_value(f"input_ids:int32=@{path}").tensor.dtype == torch.int32


@pytest.mark.parametrize(
    "make_text, problem",
    [
        (lambda d: "ids=[[1,2],[3]]", "not a rectangular array"),
        (lambda d: "ids=[[1,2]", "not valid JSON"),
        (lambda d: 'ids="hello"', "not a rectangular array"),
        (lambda d: "ids:int65=[1]", "unknown dtype"),
        (lambda d: f"ids=@{d}/missing.pt", "no such file"),
        (lambda d: f"ids=@{d}/dict.pt", "holds a dict, not a tensor"),
        (lambda d: f"ids=@{d}/text.pt", "cannot read"),
        (lambda d: "=[1]", "expected a name"),
    ],
)
def test_bad_values(tmp_path, make_text, problem):
    torch.save({"a": torch.ones(1)}, tmp_path / "dict.pt")
    (tmp_path / "text.pt").write_text("not a tensor")
    with pytest.raises(UsageError) as info:
        parse_input_value(make_text(tmp_path))
    assert problem in info.value.one_line() and "\n" not in info.value.one_line()


def test_value_file_with_pickled_object_is_not_unpickled(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UsageError, match="cannot read"):
        parse_input_value(f"x=@{path}")


def test_parse_input_arg_tells_the_forms_apart():
    assert is_value_form("ids=[[1]]") and is_value_form("ids:int64=[[1]]")
    assert not is_value_form("ids:int64[batch=1,seq=8]")
    assert isinstance(parse_input_arg("ids:int64[batch=1,seq=8]"), InputSpec)
    assert isinstance(parse_input_arg("ids=[[1,2]]"), InputValue)
