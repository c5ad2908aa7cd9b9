"""Experiment tracking with MONAI's ``--tracking mlflow``: the bundles' settings and metrics in the MLflow run.

``python -m monai.bundle run ... --tracking mlflow`` appends MONAI's ``MLFlowHandler`` to ``train#handlers``
(and to ``validate#handlers`` and ``handlers``). That handler logs, at every epoch end, what the other handlers
have put into ``engine.state.metrics`` by then (``FineTuningHandler``: ``updated_fraction``), and at the start the
parameters it was given (``experiment_param``: none by default). The bundles therefore pass their trainer's
handler list through :func:`tracked_handlers`, which moves the MLflow handlers last and gives them the bundle's
``experiment_param`` (method, gamma, shots, ...). Without ``--tracking`` it returns the list unchanged.

Example (a bundle config)::

    "imports": ["$from dgst_monai.bundle.tracking import tracked_handlers"],
    "experiment_param": {"method": "@method", "gamma": "@gamma", "shots": "@shots", "seed": "@seed"},
    "train#trainer#train_handlers": "$tracked_handlers(@train#handlers + @train#fine_tuning_handlers, @experiment_param)"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["tracked_handlers"]


def tracked_handlers(handlers: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[Any]:
    """The engine handlers in attach order, MONAI ``MLFlowHandler`` s last, each recording ``params``.

    Ignite runs the handlers of an event in the order they were attached, so a tracker attached last logs every
    metric the others set at ``EPOCH_COMPLETED``, in the same epoch. Parameters the tracking settings already
    give a handler (``experiment_param`` of a ``--tracking settings.json``) take precedence over ``params``.

    Args:
        handlers: the handler objects (a resolved ``@train#handlers``).
        params: run parameters; MLflow records each value as ``str(value)``.

    Returns:
        A new list; the handlers are the same objects.

    Example:
        >>> from monai.handlers import StatsHandler
        >>> stats = StatsHandler()
        >>> tracked_handlers([stats], {"method": "dgst"}) == [stats]
        True
    """
    from monai.handlers import MLFlowHandler  # mlflow itself is imported only when a handler is built

    trackers = [h for h in handlers if isinstance(h, MLFlowHandler)]
    for tracker in trackers:
        tracker.experiment_param = {**(params or {}), **(tracker.experiment_param or {})}
    return [h for h in handlers if not isinstance(h, MLFlowHandler)] + trackers
