"""UpdateTask trains exactly like torch.optim on the same torch module.

The spec is built with coremltools' NeuralNetworkBuilder from the module's weights and made
updatable with the builder's own helpers; the oracle is a hand-written torch loop with
torch.optim.SGD(momentum) / torch.optim.Adam on the module (batchnorm in eval mode).
"""

import copy

import numpy as np
import pytest
import torch

import mlpersonal as mp
from update_models import CNN, LABELS, dataset, layer_weights, torch_train, updatable_cnn_spec

SETTINGS = {
    "sgd": dict(lr=0.05, batch=8, epochs=2, momentum=0.9),
    "adam": dict(lr=0.01, batch=8, epochs=2, betas=(0.9, 0.99), eps=1e-7),
}


def _examples(X, y, Y, loss):
    if loss == "ce":
        return [{"image": X[i].numpy(), "label": LABELS[int(y[i])]} for i in range(len(X))]
    return [{"image": X[i].numpy(), "out_true": Y[i].numpy()} for i in range(len(X))]


def _assert_close(ours, ref, what):
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel <= 1e-5, f"{what}: relative error {rel:.2e}"
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7, err_msg=what)


@pytest.mark.parametrize("loss, optimizer, shuffle", [
    ("ce", "sgd", False), ("ce", "adam", False), ("mse", "sgd", False), ("mse", "adam", False),
    ("ce", "sgd", True), ("mse", "adam", True),
])
def test_two_epochs_match_torch_optim(loss, optimizer, shuffle):
    m = CNN()
    kw = SETTINGS[optimizer]
    spec = updatable_cnn_spec(m, loss, optimizer, seed=7 if shuffle else None, **kw)
    original = mp.load(spec)
    X, y, Y = dataset()
    before = original.predict_batch([{"image": X[i].numpy()} for i in range(3)])

    task = mp.UpdateTask(original, _examples(X, y, Y, loss), parameters={"shuffle": shuffle})
    task.resume()
    ctx = task.wait()
    assert task.state == "completed" and ctx.error is None

    ref = copy.deepcopy(m)
    orders = None
    if shuffle:  # documented: randperm(n, Generator().manual_seed(seed + epoch))
        orders = [torch.randperm(len(X), generator=torch.Generator().manual_seed(7 + e)) for e in range(2)]
    torch_train(ref, X, y if loss == "ce" else Y, loss, optimizer, orders=orders,
                **{k: v for k, v in kw.items()})

    init = copy.deepcopy(m)
    for name in ("conv1", "fc"):  # updatable: equal to the torch result, and really moved
        w = layer_weights(ctx.model.spec, name)
        mod, mod0 = getattr(ref, name), getattr(init, name)
        for field, t, t0 in (("weights", mod.weight, mod0.weight), ("bias", mod.bias, mod0.bias)):
            r = t.detach().numpy().ravel()
            assert np.abs(r - t0.detach().numpy().ravel()).max() > 1e-3
            _assert_close(w[field], r, f"{name}.{field}")
    nn_old = spec.neuralNetworkClassifier if loss == "ce" else spec.neuralNetwork
    nn_new = getattr(ctx.model.spec, ctx.model.spec.WhichOneof("Type"))
    for old, new in zip(nn_old.layers, nn_new.layers):  # frozen: bit-identical
        if not old.isUpdatable:
            assert old == new, f"frozen layer {old.name} changed"
    # the original model is untouched and still predicts the same
    assert original.spec == spec
    after = original.predict_batch([{"image": X[i].numpy()} for i in range(3)])
    for a, b in zip(before, after):
        key = "probs" if loss == "ce" else "out"
        if loss == "ce":
            assert a["probs"] == b["probs"]
        else:
            np.testing.assert_array_equal(a[key], b[key])
