"""Drive an update two ways: through the real UpdateTask (``drive``), and directly over the
Updater protocol documented in runtime.updating (``drive_local``: errors raised without a
task's thread)."""

from __future__ import annotations

from runtime.updating import run_updater as drive_local  # noqa: F401  (re-exported for tests)


def drive(model, training_data, parameters=None):
    """``model.update``: an UpdateTask run to completion; raises the task's error."""
    return model.update(training_data, parameters=parameters)
