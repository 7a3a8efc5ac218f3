"""The example scripts that start torchrun ranks or train on targets (split from
tests/test_examples.py so that pytest-xdist can run the two modules side by side)."""

from tests.test_examples import run_example


def test_partition_example(tmp_path):
    out = run_example("partition.py", tmp_path / "OUT", "--stages", "2", "--steps", "2", tmp_path=tmp_path)
    assert "same training: True" in out and "cut after stage 0" in out
    assert "max |pipeline - program| = 0" in out
    assert (tmp_path / "OUT" / "stages" / "stage_1.pt2").exists()


def test_tensor_parallel_example(tmp_path):
    out = run_example("tensor_parallel.py", tmp_path / "OUT", "--ways", "2", "--steps", "2", tmp_path=tmp_path)
    assert "same training: True" in out and "'sharded_blocks': 4" in out
    assert "| transformer.h.0.attn | heads | 4 heads | 2 |" in out
    err = float(out.split("max |ranks - program| = ")[1].split()[0])
    assert err <= 1e-5
    assert (tmp_path / "OUT" / "program.pt2").exists()


def test_train_on_target_example(tmp_path):
    out = run_example(
        "train_on_target.py", tmp_path / "runs", "--steps", "6", "--targets", "cpu,onnxruntime", tmp_path=tmp_path
    )  # the tvm loss curve (a longer build): tests/test_training_targets.py
    diff = float(out.split("onnxruntime: max |loss - cpu loss| over 6 steps = ")[1].split()[0])
    assert diff < 1e-3, out
    assert (tmp_path / "runs" / "onnxruntime" / "program.pt2").exists()
