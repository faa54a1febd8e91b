"""How larnn.py picks its path: the fused C++ layer (fused/) or PyTorch.

Its equivalence with the reference is tested in test_larnn.py, which runs on both."""
import subprocess
import sys

import pytest
import torch

import fused


def test_the_fused_layer_is_built_and_used_on_the_cpu(monkeypatch):
    monkeypatch.setenv("LARNN_BACKEND", "auto")
    assert fused.applies(torch.zeros(2, 2, 3))
    assert not fused.applies(torch.zeros(2, 2, 3, dtype=torch.float16))


def test_the_environment_variable_forces_either_path(monkeypatch):
    monkeypatch.setenv("LARNN_BACKEND", "pytorch")
    assert not fused.applies(torch.zeros(2, 2, 3))
    monkeypatch.setenv("LARNN_BACKEND", "fused")
    with pytest.raises(ValueError, match="runs float32 or float64 on the CPU"):
        fused.applies(torch.zeros(2, 2, 3, dtype=torch.float16))
    monkeypatch.setenv("LARNN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="LARNN_BACKEND must be one of"):
        fused.applies(torch.zeros(2, 2, 3))


def test_each_checkout_has_its_own_build_name(tmp_path):
    """Two clones sharing torch's cache keep a build each, not one they rebuild in turn."""
    here = fused.build_name("AVX512")
    assert here == fused.build_name("AVX512", fused.SOURCE)  # stable for a checkout
    assert here.startswith("larnn_fused_avx512_")
    assert fused.build_name("AVX512", tmp_path / "clone" / "fused" / "larnn_layer.cpp") != here
    assert fused.build_name("AVX2") != here


def test_without_a_compiler_one_line_says_so_and_pytorch_runs(tmp_path):
    """A fresh process whose build fails (no compiler found on PATH, empty cache)."""
    code = ("import torch, larnn, fused; m = larnn.LARNN(3, 4, 2, 1, 2); "
            "print(tuple(m(torch.randn(5, 2, 3))[0].shape), fused.extension())")
    env = {"PATH": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "CXX": str(tmp_path / "no-compiler"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(5, 2, 4) None"
    lines = [line for line in result.stderr.splitlines() if line.startswith("larnn:")]
    assert len(lines) == 1 and "could not be built" in lines[0] and "PyTorch path" in lines[0]


@pytest.mark.parametrize("retain", [False, True])
def test_a_pass_is_freed_once_its_backward_has_run(retain):
    """A pass's buffers go back to the pool as soon as autograd releases the node's
    saved state, not when the graph is dropped; with retain_graph it stays, and a second
    backward gives the same gradients (test_larnn checks them); without, a second
    backward gets autograd's own error."""
    import larnn
    cell = larnn.LARNN(3, 4, 2, 1, 2).layers[0]
    inputs = torch.randn(5, 2, 3)
    outputs, _ = fused.sequence(cell, inputs)
    node = outputs.grad_fn
    assert len(node.layer_pass) == 1
    outputs.sum().backward(retain_graph=retain)
    assert len(node.layer_pass) == (1 if retain else 0)
    if not retain:
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            outputs.sum().backward()
