import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests import examples.* and tests.hf_models

# Under pytest-xdist (`make test` runs `-n auto`), share the cores between the workers: one torch /
# OpenMP / TVM pool per worker sized to its share, inherited by the CLI subprocesses tests start.
# Oversubscribed pools (every worker using every core) run many times slower, not a little.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ[_var] = _THREADS

    import torch

    torch.set_num_threads(int(_THREADS))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (their small kernels gain nothing from more), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- optpipe tune (tests/test_tune.py, tests/test_tune_study.py; helpers in tests/tune_helpers.py) ----
@pytest.fixture(scope="session")
def pydoc_text(tmp_path_factory) -> str:
    """Python's own documentation as a text corpus (`pydoc_data`: text nobody here wrote)."""
    from optpipe.runtime.data import pydoc_corpus

    path = tmp_path_factory.mktemp("pydoc") / "pydoc.txt"
    pydoc_corpus(path)
    return str(path)


@pytest.fixture(scope="session")
def tune_program():
    """tune_helpers.MODEL captured once per worker."""
    from optpipe.loading import load_model
    from tests.tune_helpers import MODEL

    return load_model(MODEL)


@pytest.fixture
def tuned(pydoc_text, tune_program):
    """`tune_helpers.run` on the captured program."""
    from tests.tune_helpers import run

    return lambda out, **kw: run(pydoc_text, out, program=tune_program, **kw)
