"""Placeholder end-to-end flow until the sticker example lands: build a small CNN spec, load it
with the mlpersonal runtime, predict a batch, print a table."""

import time

import numpy as np
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder

import mlpersonal as mp

rng = np.random.default_rng(0)
b = NeuralNetworkBuilder([("image", datatypes.Array(1, 28, 28))], [("probs", datatypes.Array(4))],
                         mode="classifier")
b.add_convolution("conv", 1, 8, 3, 3, 1, 1, "same", 1, rng.standard_normal((3, 3, 1, 8)).astype(np.float32),
                  np.zeros(8, np.float32), True, input_name="image", output_name="c")
b.add_activation("relu", "RELU", "c", "r")
b.add_pooling("pool", 2, 2, 2, 2, "MAX", "VALID", input_name="r", output_name="p")
b.add_flatten("flat", 0, "p", "f")
b.add_inner_product("fc", rng.standard_normal((4, 8 * 14 * 14)).astype(np.float32) * 0.01, None,
                    8 * 14 * 14, 4, False, "f", "logits")
b.add_softmax("softmax", "logits", "probs")
b.set_class_labels(["heart", "star", "sun", "house"])
m = mp.load(b.spec)
batch = [{"image": rng.random((1, 28, 28), dtype=np.float32)} for _ in range(64)]
t = time.perf_counter()
outs = m.predict_batch(batch)
dt = time.perf_counter() - t
print(f"{'model':<10}{'batch':>6}{'ms':>10}  first labels")
print(f"{'tiny CNN':<10}{len(batch):>6}{dt * 1e3:>10.2f}  {[o['classLabel'] for o in outs[:4]]}")
