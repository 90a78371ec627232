"""Models for the update tests: torch modules and the same networks as Core ML specs built with
coremltools' NeuralNetworkBuilder (never with our exporter), plus a torch reference trainer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from coremltools.models import datatypes
from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams

LABELS = ["circle", "heart", "star", "moon", "sun"]


class CNN(torch.nn.Module):
    """conv1 (updatable) -> bn -> relu -> maxpool -> conv2 (frozen) -> relu -> flatten -> fc (updatable)."""

    def __init__(self, n_out: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 6, 3)
        self.fc = torch.nn.Linear(6 * 3 * 3, n_out)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            self.bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        self.eval()  # batchnorm in inference mode, as Core ML runs it

    def updatable(self):
        return [self.conv1.weight, self.conv1.bias, self.fc.weight, self.fc.bias]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def _np(t):
    return t.detach().cpu().numpy().astype(np.float32)


def cnn_builder(m: CNN, loss: str) -> NeuralNetworkBuilder:
    """The same network as a spec: a classifier ending in softmax (loss 'ce') or a regressor-like
    plain network whose output is the fc output (loss 'mse')."""
    n_out = m.fc.out_features
    if loss == "ce":
        b = NeuralNetworkBuilder([("image", datatypes.Array(1, 10, 10))], [("probs", datatypes.Array(n_out))],
                                 mode="classifier")
    else:
        b = NeuralNetworkBuilder([("image", datatypes.Array(1, 10, 10))], [("out", datatypes.Array(n_out))])
    b.add_convolution("conv1", 1, 4, 3, 3, 1, 1, "same", 1, _np(m.conv1.weight).transpose(2, 3, 1, 0),
                      _np(m.conv1.bias), True, input_name="image", output_name="c1")
    b.add_batchnorm("bn", 4, _np(m.bn.weight), _np(m.bn.bias), _np(m.bn.running_mean),
                    _np(m.bn.running_var), input_name="c1", output_name="b1", epsilon=m.bn.eps)
    b.add_activation("relu1", "RELU", "b1", "r1")
    b.add_pooling("pool", 2, 2, 2, 2, "MAX", "VALID", "r1", "p1")
    b.add_convolution("conv2", 4, 6, 3, 3, 1, 1, "valid", 1, _np(m.conv2.weight).transpose(2, 3, 1, 0),
                      _np(m.conv2.bias), True, input_name="p1", output_name="c2")
    b.add_activation("relu2", "RELU", "c2", "r2")
    b.add_flatten("flatten", 0, "r2", "f")
    if loss == "ce":
        b.add_inner_product("fc", _np(m.fc.weight), _np(m.fc.bias), 54, n_out, True, "f", "logits")
        b.add_softmax("softmax", "logits", "probs")
        b.set_class_labels(LABELS[:n_out], predicted_feature_name="label")
    else:
        b.add_inner_product("fc", _np(m.fc.weight), _np(m.fc.bias), 54, n_out, True, "f", "out")
    return b


def updatable_cnn_spec(m: CNN, loss: str, optimizer: str, *, lr=0.05, batch=8, epochs=2,
                       momentum=0.9, betas=(0.9, 0.999), eps=1e-8, seed=None):
    """The CNN made updatable (conv1 + fc) with coremltools' builder helpers."""
    b = cnn_builder(m, loss)
    b.make_updatable(["conv1", "fc"])
    if loss == "ce":
        b.set_categorical_cross_entropy_loss("lossLayer", input="probs")
    else:
        b.set_mean_squared_error_loss("lossLayer", input_feature=("out", datatypes.Array(m.fc.out_features)))
    if optimizer == "sgd":
        p = SgdParams(lr=lr, batch=batch, momentum=momentum)
        p.set_batch(batch, [batch, 2, 32])
        b.set_sgd_optimizer(p)
    else:
        p = AdamParams(lr=lr, batch=batch, beta1=betas[0], beta2=betas[1], eps=eps)
        p.set_batch(batch, [batch, 2, 32])
        b.set_adam_optimizer(p)
    b.set_epochs(epochs, [1, 2, 3, 5, 10])
    if seed is not None:
        b.set_shuffle(seed=seed)
    return b.spec


def torch_train(m: CNN, X, target, loss: str, optimizer: str, *, lr, batch, epochs, momentum=0.0,
                betas=(0.9, 0.999), eps=1e-8, orders=None):
    """Reference: torch.optim on the module's updatable parameters; frozen ones untouched."""
    for p in m.parameters():
        p.requires_grad_(False)
    params = m.updatable()
    for p in params:
        p.requires_grad_(True)
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    n = len(X)
    losses = []
    for e in range(epochs):
        order = orders[e] if orders is not None else torch.arange(n)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            out = m(X[idx])
            lv = F.cross_entropy(out, target[idx]) if loss == "ce" else F.mse_loss(out, target[idx])
            opt.zero_grad()
            lv.backward()
            opt.step()
            losses.append(float(lv))
    return losses


def layer_weights(spec, name: str) -> dict:
    """{'weights': array, 'bias': array} of a conv/innerProduct layer of ``spec``, float32."""
    nn = getattr(spec, spec.WhichOneof("Type"))
    layer = next(l for l in nn.layers if l.name == name)
    p = getattr(layer, layer.WhichOneof("layer"))
    return {"weights": np.asarray(p.weights.floatValue, np.float32),
            "bias": np.asarray(p.bias.floatValue, np.float32)}


def dataset(n: int = 20, n_out: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, 10, 10, generator=g)
    y = torch.randint(0, n_out, (n,), generator=g)
    Y = torch.randn(n, n_out, generator=g)
    return X, y, Y
