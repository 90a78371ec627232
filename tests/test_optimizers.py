"""runtime.optimizers (Core ML's SGD and Adam) against torch.optim, step by step."""

import numpy as np
import pytest
import torch

from runtime import optimizers


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, requires_grad=True) for shape in ((4, 3), (3,), (2, 2, 2))]


def _grads(step, n):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in ((4, 3), (3,), (2, 2, 2))][:n]


@pytest.mark.parametrize("kind,kw,changed", [
    ("sgd", {"lr": 0.1}, {"lr": 0.05}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, {"lr": 0.02, "momentum": 0.5}),
    ("adam", {"lr": 0.01}, {"lr": 0.003}),
    ("adam", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}, {"betas": (0.5, 0.9), "eps": 1e-3}),
])
def test_matches_torch_optim(kind, kw, changed):
    """Six steps; the third parameter has no gradient in steps 1 and 2 (left alone, state
    included), hyperparameters change after step 3 (as a progress handler may)."""
    ours_p, ref_p = _params(0), _params(0)
    ours = (optimizers.SGD if kind == "sgd" else optimizers.Adam)(ours_p, **kw)
    ref = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)(ref_p, **kw)
    for step in range(6):
        if step == 3:
            for k, v in changed.items():
                setattr(ours, k, v)
                ref.param_groups[0][k] = v
        n = 2 if step in (1, 2) else 3
        for ps in (ours_p, ref_p):
            for p in ps:
                p.grad = None
            for p, g in zip(ps, _grads(step, n)):
                p.grad = g.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(ours_p, _params(0)))  # it moved
    ours.zero_grad()
    assert all(p.grad is None for p in ours_p)


def test_no_gradients_is_a_no_op():
    ps = _params(1)
    before = [p.detach().clone() for p in ps]
    for opt in (optimizers.SGD(ps, 0.1, 0.9), optimizers.Adam(ps, 0.1)):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, before))


def test_an_update_task_never_imports_torch_optim():
    """The runtime's optimizers are its own: importing torch.optim's first optimizer pulls in
    torch._dynamo (0.4-1 s before a first on-device update)."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); import numpy as np, mlpersonal as mp\n"
            "from update_models import CNN, LABELS, dataset, updatable_cnn_spec\n"
            "X, y, _ = dataset(); spec = updatable_cnn_spec(CNN(), 'ce', 'adam')\n"
            "print('torch._dynamo' in sys.modules)\n"
            "mp.load(spec).update([{'image': X[i].numpy(), 'label': LABELS[int(y[i])]} for i in range(8)])\n"
            "print('torch._dynamo' in sys.modules)")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    before, after = out.stdout.strip().splitlines()[-2:]
    if before == "True":  # torch 2.11 imports it for the test's own set-up already
        pytest.skip(f"torch {torch.__version__} imports torch._dynamo before any update")
    assert after == "False"
