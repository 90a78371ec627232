"""The Updater protocol: how UpdateTask trains any kind of compiled model.

``CompiledModel.make_updater()`` returns an :class:`Updater` working on a private copy of the
model (the original keeps predicting unchanged). :class:`runtime.update.UpdateTask` drives it:

    up = model.make_updater()                          # raises if the model is not updatable
    values = resolve(up.parameters(), overrides)       # defaults + checked overrides
    up.prepare(training_data, values)                  # validate + encode; raises InvalidInputError
    epoch = 0
    while epoch < up.num_epochs(values):
        for loss in up.mini_batches(epoch, values):    # one optimizer step per yielded loss
            ...                                        # mini_batch_end event
        ...                                            # epoch_end event
        epoch += 1
    updated = up.result()                              # CompiledModel with the new spec

``values`` is one live dict: handlers may change it between two yields (``task.resume(
parameters=...)``), so ``mini_batches`` reads it again before each step (learning rate,
mini-batch size, ...) and at the start of each epoch (shuffle, seed); ``num_epochs`` is asked
again after every epoch. Everything that can be checked is checked in ``prepare`` (nothing is
trained or written when it raises). ``result()`` may be called more than once (the task calls
it for a snapshot when a handler reads ``ctx.model``).

Neural networks train by backprop (runtime.update), kNN classifiers append examples
(runtime.knn), pipelines transform examples through the stages before the updatable one and
delegate to that stage's updater (runtime.pipeline).
"""

from __future__ import annotations

from typing import Any, Iterator

from mlpersonal.errors import InvalidModelError
from mlpersonal.update_params import Parameter, read_parameters


class Updater:
    """Base class: override :meth:`prepare`, :meth:`mini_batches` and :meth:`result`."""

    def __init__(self, model):
        if not model.spec.isUpdatable:
            raise InvalidModelError(
                "this model is not updatable (spec.isUpdatable is false); export it with "
                "respect_trainable=True and an UpdateConfig, or use coremltools' make_updatable"
            )
        self.model = model

    def parameters(self) -> dict[str, Parameter]:
        """The update parameters the model defines (defaults and allowed values)."""
        return read_parameters(self.model.spec)

    def prepare(self, training_data: list[dict], values: dict[str, Any]) -> None:
        raise NotImplementedError

    #: many small ops per step (recurrent layers): a background training thread computes on one
    #: OpenMP thread (see runtime.update.UpdateTask)
    serial = False

    def num_epochs(self, values: dict[str, Any]) -> int:
        return int(values.get("epochs", 1))

    def mini_batches(self, epoch: int, values: dict[str, Any]) -> Iterator[float]:
        raise NotImplementedError

    def result(self):
        """The updated CompiledModel (spec written back, still updatable)."""
        raise NotImplementedError


def run_updater(model, training_data: list, parameters: dict | None = None):
    """Drive ``model``'s updater synchronously in this thread (no events, no copy of the
    task machinery): resolve -> prepare -> epochs of mini-batches -> result. Errors raise."""
    from mlpersonal.update_params import resolve

    up = model.make_updater()
    values = resolve(up.parameters(), parameters)
    up.prepare(training_data, values)
    for epoch in range(up.num_epochs(values)):
        for _loss in up.mini_batches(epoch, values):
            pass
    return up.result()

