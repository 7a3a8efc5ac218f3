"""The pass runner: verification after every pass, budgets, instruments, plugins, presets, recipes."""

import io
import os
import textwrap

import pytest
import torch
import torch.nn as nn

import tests.toy_passes  # noqa: F401
from optpipe import Pipeline, capture
from optpipe.errors import PassError, UsageError, VerificationError
from optpipe.instruments import DumpIR, PassTiming, PrintAfterChange
from optpipe.presets import load_recipe, preset_pipeline
from optpipe.verify import Budget


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.head(torch.relu(self.fc(h)) + torch.relu(self.fc(h)))


@pytest.fixture
def program():
    torch.manual_seed(0)
    return capture(Mlp(), (torch.randint(0, 50, (1, 12)),))


def test_exact_pass_verified_and_recorded(program):
    prog2, records = Pipeline.parse("cse,dce").run(program)
    (cse, dce) = records
    assert cse.modified and cse.stats["eliminated"] >= 1
    assert cse.verify["ok"] and cse.verify["max_abs"] == 0.0 and cse.verify["inputs"] == 3
    assert prog2.history == ["cse", "dce"] and program.history == []  # the input program is untouched
    x = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(prog2.gm(x), program.gm(x))


def test_broken_exact_pass_stops_the_pipeline_naming_it(program):
    with pytest.raises(VerificationError, match=r"exact pass test-broken-exact \(after cse\) changed the outputs"):
        Pipeline.parse("cse,test-broken-exact,dce").run(program)


def test_lossy_pass_reports_quality_numbers(program):
    _, (rec,) = Pipeline.parse("test-add-noise{scale=0.01}").run(program)
    v = rec.verify
    assert not rec.exact and v["ok"]
    assert 39 < v["sqnr_db"] < 41  # 20*log10(1/0.01)
    assert v["cosine"] > 0.9999 and v["top1_agreement"] == 1.0 and v["max_abs"] > 0


def test_budget_stops_a_lossy_pass(program):
    with pytest.raises(VerificationError, match="over budget: SQNR 20.0 dB < 30"):
        Pipeline.parse("test-add-noise{scale=0.1}").run(program, budget=Budget(sqnr=30))
    with pytest.raises(VerificationError, match="over budget"):
        Pipeline.parse("test-add-noise{scale=0.1,min-sqnr=25}").run(program)
    Pipeline.parse("test-add-noise{scale=0.1}").run(program, budget=Budget(sqnr=15))  # within budget


def test_pass_budget_overrides_the_global_one(program):
    with pytest.raises(VerificationError, match="over budget: SQNR 20.0 dB < 25"):  # SQNR 20 dB
        Pipeline.parse("test-add-noise{scale=0.1,min-sqnr=25}").run(program, budget=Budget(sqnr=15))
    Pipeline.parse("test-add-noise{scale=0.1,min-sqnr=15}").run(program, budget=Budget(sqnr=30))


def test_a_lossy_pass_config_subclasses_lossy_config():
    from dataclasses import dataclass

    from optpipe.pipeline_text import parse_pipeline
    from optpipe.registry import config_fields, get_pass, register_pass

    @dataclass(frozen=True)
    class OwnBudget:
        min_sqnr: float | None = None

    with pytest.raises(TypeError, match="must subclass optpipe.registry.LossyConfig"):
        register_pass("test-lossy-without-budget", OwnBudget, exact=False)
    # the budget options come after the pass's own, in listings and in canonical text
    info = get_pass("test-add-noise")
    assert [f.name for f in config_fields(info.config_cls)] == ["scale", "min_sqnr", "min_cosine"]
    assert [o["name"] for o in info.options()] == ["scale", "min-sqnr", "min-cosine"]
    (spec,) = parse_pipeline("test-add-noise{min-cosine=0.5,scale=0.2}")
    assert str(spec) == "test-add-noise{scale=0.2,min-cosine=0.5}"
    with pytest.raises(UsageError, match=r"min-cosine must be in \[-1, 1\]"):
        parse_pipeline("test-add-noise{min-cosine=2}")


def test_unmodified_pass_is_not_rerun(program):
    _, (rec,) = Pipeline.parse("test-add-noise{scale=0}").run(program)
    assert not rec.modified and rec.verify["note"] == "unchanged"


def test_pass_exception_is_wrapped_with_its_name(program):
    with pytest.raises(PassError, match=r"pass test-raises failed \(after cse\): RuntimeError: kaboom"):
        Pipeline.parse("cse,test-raises").run(program)


def test_instruments(program, tmp_path):
    stream, timing = io.StringIO(), io.StringIO()
    _, records = Pipeline.parse("cse,dce,cse").run(
        program, instruments=[DumpIR(tmp_path), PrintAfterChange(stream), PassTiming(timing)]
    )
    names = sorted(os.listdir(tmp_path))
    assert names[:3] == ["000_cse.after.py", "000_cse.before.py", "000_cse.diff"] and len(names) == 9
    diff = (tmp_path / "000_cse.diff").read_text()
    assert diff.startswith("---") and "-" in diff
    printed = stream.getvalue()
    assert records[0].modified and not records[2].modified
    assert printed.count("IR after") == sum(r.modified for r in records)  # only passes that changed the IR
    assert "000 cse" in timing.getvalue() and " ms" in timing.getvalue()


def test_entry_point_plugin_registers_a_pass(tmp_path, monkeypatch):
    (tmp_path / "my_optpipe_plugin.py").write_text(
        textwrap.dedent('''
        from dataclasses import dataclass
        from optpipe.registry import register_pass, PassResult

        @dataclass(frozen=True)
        class Cfg:
            pass

        @register_pass("plugin-noop", Cfg, exact=True)
        def noop(program, config):
            """Does nothing, from a plugin."""
            return PassResult(False, {})
    ''')
    )
    dist = tmp_path / "my_optpipe_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-optpipe-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[optpipe.passes]\nnoop = my_optpipe_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import optpipe.registry as reg

    monkeypatch.setattr(reg, "_PLUGINS_LOADED", False)
    assert "plugin-noop" in reg.pass_names()
    assert reg.get_pass("plugin-noop").summary == "Does nothing, from a plugin."


def test_presets_and_recipes(tmp_path):
    assert str(Pipeline.parse(preset_pipeline("canonicalize"))) == "fuse-attention,cse,dce"
    with pytest.raises(UsageError, match="unknown preset 'canonicalise'"):
        preset_pipeline("canonicalise")
    r = tmp_path / "r.toml"
    r.write_text(
        'target = "cpu"\nbudget = { sqnr = 20 }\n[[passes]]\nname = "cse"\n'
        '[[passes]]\nname = "test-add-noise"\nscale = 0.5\n'
    )
    data = load_recipe(r)
    assert str(Pipeline.parse(data["pipeline"])) == "cse,test-add-noise{scale=0.5}"
    assert data["budget"] == {"sqnr": 20}
    r.write_text('pipeline = "fuse-attention,dce"\n')
    assert load_recipe(r)["pipeline"] == "fuse-attention,dce"
    r.write_text("pipeline = [")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_recipe(r)


def test_program_keeps_working_at_other_lengths_and_round_trips(program, tmp_path):
    prog2, _ = Pipeline.parse("cse,dce").run(program)
    path = tmp_path / "p.pt2"
    prog2.save(path)
    from optpipe import load_program

    loaded = load_program(path)
    assert loaded.history == ["cse", "dce"] and loaded.input_names == ["input_ids"]
    assert loaded.dynamic_shapes == [{0: "batch", 1: "seq"}]
    for shape in [(1, 12), (3, 5), (1, 1), (2, 40)]:
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(loaded.gm(x), program.gm(x))
    # plain torch.export works too
    ep = torch.export.load(str(path))
    torch.testing.assert_close(ep.module()(x), program.gm(x))
