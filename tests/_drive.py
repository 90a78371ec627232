"""Drive an update two ways: through the real UpdateTask (``drive``), and directly over the
Updater protocol documented in runtime.updating (``drive_local``: resolve -> prepare ->
epochs/mini_batches -> result, errors raised without a task's thread)."""

from __future__ import annotations

from mlpersonal.update_params import resolve


def drive(model, training_data, parameters=None):
    """``model.update``: an UpdateTask run to completion; raises the task's error."""
    return model.update(training_data, parameters=parameters)


def drive_local(model, training_data, parameters=None):
    """The protocol loop itself."""
    up = model.make_updater()
    values = resolve(up.parameters(), parameters)
    up.prepare(training_data, values)
    for epoch in range(up.num_epochs(values)):
        for _loss in up.mini_batches(epoch, values):
            pass
    return up.result()
