"""trainers.fit against hand-written torch loops (the oracle) and its contract."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from mlpersonal.errors import MLPersonalError, TrainingError
from trainers import fit


def _problem(n=200, d=10, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, (x @ w).argmax(1)


def _net(d=10, k=4):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))


def _hand_loop(net, x, y, epochs, bs, opt, order=None):
    for e in range(epochs):
        idx = torch.arange(len(x)) if order is None else order(e)
        for i in range(0, len(x), bs):
            b = idx[i:i + bs]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()


def test_reduces_loss_and_reports_it():
    x, y = _problem()
    net = _net()
    with torch.no_grad():
        before = F.cross_entropy(net(x), y).item()
    hist = fit(net, (x, y), epochs=8, batch_size=16, lr=1e-2, val_data=(x, y), progress=False)
    with torch.no_grad():
        after = F.cross_entropy(net(x), y).item()
    assert len(hist) == 8 and [h["epoch"] for h in hist] == list(range(1, 9))
    assert after < 0.3 * before
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["val_loss"] == pytest.approx(after, rel=1e-5)
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert hist[-1]["val_accuracy"] == pytest.approx(acc) and acc > 0.9


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_matches_hand_written_loop_exactly(optimizer):
    x, y = _problem(n=150)  # 150 / 16: the last batch is short
    a, b = _net(), _net()
    fit(a, (x, y), epochs=1, batch_size=16, optimizer=optimizer, lr=1e-2, shuffle=False, progress=False)
    opt = (torch.optim.Adam(b.parameters(), lr=1e-2) if optimizer == "adam"
           else torch.optim.SGD(b.parameters(), lr=1e-2, momentum=0.9))
    _hand_loop(b, x, y, 1, 16, opt)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_shuffled_epochs_follow_the_seeded_order():
    x, y = _problem(n=96)
    a, b = _net(), _net()
    fit(a, (x, y), epochs=3, batch_size=8, lr=1e-2, seed=5, progress=False)
    order = lambda e: torch.randperm(96, generator=torch.Generator().manual_seed(5 + e))  # noqa: E731
    _hand_loop(b, x, y, 3, 8, torch.optim.Adam(b.parameters(), lr=1e-2), order)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_dataset_input_equals_tensor_input():
    x, y = _problem(n=64)

    class Pairs(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    a, b = _net(), _net()
    fit(a, (x, y), epochs=2, batch_size=10, progress=False)
    fit(b, Pairs(), epochs=2, batch_size=10, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_only_parameters_that_require_grad_change():
    x, y = _problem(n=64)
    net = _net()
    for p in net[0].parameters():
        p.requires_grad_(False)
    frozen = copy.deepcopy(net[0].state_dict())
    head = copy.deepcopy(net[2].state_dict())
    fit(net, (x, y), epochs=2, batch_size=16, progress=False)
    for k, v in net[0].state_dict().items():
        assert torch.equal(v, frozen[k])
    assert not torch.equal(net[2].weight, head["weight"])


def test_checkpoints_per_epoch(tmp_path):
    x, y = _problem(n=64)
    net = _net()
    fit(net, (x, y), epochs=3, batch_size=16, checkpoint_dir=tmp_path / "ck", progress=False)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]  # no temp files left behind
    last = torch.load(tmp_path / "ck" / "epoch_003.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(last[k], v)
    first = torch.load(tmp_path / "ck" / "epoch_001.pt", weights_only=True)
    assert not torch.equal(first["2.weight"], last["2.weight"])


def test_mse_loss_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    hist = fit(net, (x, y), epochs=30, batch_size=16, lr=5e-2, loss="mse", val_data=(x, y), progress=False)
    assert "val_accuracy" not in hist[-1]
    assert hist[-1]["val_loss"] < 1e-2 < hist[0]["loss"]


def test_bad_input_gives_clear_errors():
    x, y = _problem(n=16)
    net = _net()
    with pytest.raises(TrainingError, match="Dataset or an"):
        fit(net, x, progress=False)
    with pytest.raises(MLPersonalError, match="unknown loss"):
        fit(net, (x, y), loss="hinge", progress=False)
    with pytest.raises(TrainingError, match="unknown optimizer"):
        fit(net, (x, y), optimizer="lbfgs2", progress=False)
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="requires grad"):
        fit(net, (x, y), progress=False)


def test_nan_loss_is_reported():
    x, y = _problem(n=32)
    x[5, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss is not finite.*nan"):
        fit(_net(), (x, y), batch_size=8, shuffle=False, progress=False)
