"""`optpipe tune` as a study: the time budget, a killed run resumed without losing or repeating a
trial, and healing candidates by distillation (split from test_tune.py so that xdist runs the two
modules side by side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from optpipe.errors import UsageError
from optpipe.runtime.tuning_space import SearchSpace
from tests.tune_helpers import lines, model_cost


def test_time_budget_is_honoured_within_one_trial(tuned, tmp_path):
    def sleepy(fn, program, candidate):
        time.sleep(0.5)
        return model_cost(fn, program, candidate)

    space = SearchSpace(
        attention=("dense",), prune=(0.0, 0.25, 0.5), quantize=("none", "int8-dynamic"), mode=("eager",)
    )
    tuned(tmp_path / "tb", measure=sleepy, space=space, trials=50, time_budget=2.0)
    summary = json.loads((tmp_path / "tb" / "tune.json").read_text())
    longest = max(r["seconds"] for r in lines(tmp_path / "tb" / "trials.jsonl"))
    assert summary["trials"] < 5  # the space holds 5 besides the baseline: it stopped for time
    # at most one trial past the budget (+1 s of bookkeeping on a loaded machine); then best/ is built
    assert summary["seconds"] <= 2.0 + longest + 1.0


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, os.getcwd())
    from tests.tune_helpers import MODEL, SPACE, FAST, model_cost
    from optpipe.runtime.tuning import tune
    calls = []
    def measure(fn, program, candidate):
        calls.append(candidate)
        if len(calls) == 3:  # the baseline, one trial, then die in the middle of the second trial
            os.kill(os.getpid(), signal.SIGKILL)
        return model_cost(fn, program, candidate)
    tune(MODEL, sys.argv[1], sys.argv[2], budget="ppl=+5%", space=SPACE, measure=measure, trials=3, **FAST)
    """
)


def test_killed_study_resumes_without_losing_or_repeating_a_trial(pydoc_text, tuned, tmp_path):
    out = tmp_path / "k"
    p = subprocess.run(
        [sys.executable, "-c", KILLER, pydoc_text, str(out)], capture_output=True, text=True, cwd=os.getcwd()
    )
    assert p.returncode == -9, p.stderr[-2000:]
    before = lines(out / "trials.jsonl")
    assert [r["trial"] for r in before] == ["baseline", 0]
    with pytest.raises(UsageError, match="already holds a study"):
        tuned(out, trials=3)
    res = tuned(out, trials=3, resume=True)
    after = lines(out / "trials.jsonl")
    assert after[:2] == before  # nothing measured again
    keys = [r["key"] for r in after]
    assert len(after) == 4 and len(set(keys)) == 4  # 3 trials besides the baseline, all distinct
    assert after[2].get("params") is not None and res.best["within_budget"]


@pytest.mark.slow
def test_heal_steps_heal_candidates_within_reach(tuned, tmp_path):
    """A pruned candidate just past a top-1 budget is healed by distillation from the model, then
    judged again on the healed program; best/ is then the healed OUT."""
    space = SearchSpace(attention=("dense",), prune=(0.0, 0.5), quantize=("none",), mode=("eager",))
    res = tuned(tmp_path / "h", space=space, trials=1, budget="top1=0.97", heal_steps=4)
    trial = res.records[1]
    healed = trial["healed"]
    before = healed["quality_before"]
    assert before["top1_agreement"] < 0.97  # outside the budget before healing, within reach (3 budgets)
    assert healed["steps"] == 4 and os.path.isfile(os.path.join(healed["out"], "metrics.jsonl"))
    assert trial["quality"]["top1_agreement"] != before["top1_agreement"]  # judged again, on the healed program
    assert trial["cost"] == pytest.approx(model_cost(None, None, trial["params"]))
