"""Drive an update the way runtime.updating documents it.

Uses the real ``UpdateTask`` when ``runtime.update`` exists on this branch, else a minimal loop
over the same Updater protocol (resolve -> prepare -> epochs/mini_batches -> result).
"""

from __future__ import annotations

from mlpersonal.update_params import resolve


def drive(model, training_data, parameters=None):
    try:
        from runtime.update import UpdateTask
    except ImportError:
        UpdateTask = None
    if UpdateTask is not None:
        task = UpdateTask(model, training_data=training_data, parameters=parameters)
        task.resume()
        ctx = task.wait()
        if getattr(task, "state", "completed") == "failed":
            raise getattr(task, "error", RuntimeError("update task failed"))
        return ctx.model
    return drive_local(model, training_data, parameters)


def drive_local(model, training_data, parameters=None):
    """Always the protocol loop (errors raise directly, without a task's thread)."""
    up = model.make_updater()
    values = resolve(up.parameters(), parameters)
    up.prepare(training_data, values)
    for epoch in range(up.num_epochs(values)):
        for _loss in up.mini_batches(epoch, values):
            pass
    return up.result()
