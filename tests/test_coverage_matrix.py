"""The coverage matrix as tests: every family in tests/hf_zoo.py through every stage.

`make test` runs the FAST slice of tests/coverage_stages.py; `make coverage` runs every cell. A cell
listed in LIMITATIONS (a named limitation of torch.export / the ONNX exporter / TVM) must fail:
strict xfail, so a fix upstream shows up here.
"""

from __future__ import annotations

import pytest

from tests import coverage_stages as cs
from tests import hf_zoo

CELLS = [(arch, stage) for arch in hf_zoo.ARCHS for stage in cs.STAGES if cs.applies(arch, stage)]


def _param(arch: str, stage: str):
    marks = [] if (arch, stage) in cs.FAST else [pytest.mark.coverage]
    if (arch, stage) in cs.LIMITATIONS:
        marks.append(pytest.mark.xfail(reason=cs.LIMITATIONS[arch, stage], strict=True))
    return pytest.param(arch, stage, marks=marks, id=f"{arch}-{stage}")


@pytest.mark.parametrize(("arch", "stage"), [_param(a, s) for a, s in CELLS])
def test_cell(arch, stage):
    detail = cs.RUN[stage](arch)
    assert detail


def test_every_decoder_generates_and_encoders_do_not():
    assert cs.applies("gpt2", "kv-cache") and not cs.applies("bert", "kv-cache")
    assert set(hf_zoo.DECODERS) < set(hf_zoo.ARCHS)
    assert all(stage in cs.STAGE_TITLES for stage in cs.STAGES)
