"""``predicted_step_s`` on the machine the run is on: the chooser's model, calibrated by the run's own steps.

The chooser (:mod:`.chooser`) prices a step on the simulator's model of the job: an H100's kernel and
memory, ``parallel.network``'s links. On other machines -- CPU ranks on gloo above all, where a small
model's step is mostly per-layer and per-collective fixed costs -- its seconds are not the step's:
about 1e-4 s for a step that takes 0.5 s. :class:`StepCalibration` maps them onto this machine with
``measured = a + b * model``, least squares over the last :data:`WINDOW` steps that ran a choice
(``a, b >= 0``): ``b`` says how much of the model's differences between layouts this machine shows,
``a`` what it pays whatever the layout. A step is predicted only from the steps before it, so the
agreement it reports is a forecast, not a fit. The run's first step is left out (it pays one-time
costs: the chooser's screen fits, first allocations), and until :data:`FIRST` steps have been seen
the prediction is the model's own seconds.

The calibration is the rank's (its own step time) and starts afresh on resume: it shapes a metric,
never the training.
"""

from __future__ import annotations

from collections import deque

import numpy as np

WINDOW = 16   # the most recent steps fitted: the machine's load drifts
FIRST = 2     # steps seen before the model's seconds are calibrated


class StepCalibration:
    """``measured ≈ a + b * model`` over the run's recent steps (module docstring)."""

    def __init__(self):
        self._model: deque[float] = deque(maxlen=WINDOW)
        self._measured: deque[float] = deque(maxlen=WINDOW)
        self._skipped_first = False

    def predict(self, model_s: float) -> float:
        """The step's seconds on this machine for a choice the model prices at ``model_s``."""
        if len(self._model) < FIRST:
            return model_s
        a, b = self.fit()
        return a + b * model_s

    def add(self, model_s: float, measured_s: float) -> None:
        """A step that ran a choice the model priced at ``model_s`` and took ``measured_s``."""
        if not self._skipped_first:
            self._skipped_first = True
            return
        self._model.append(model_s)
        self._measured.append(measured_s)

    def fit(self) -> tuple[float, float]:
        """``(a, b)``, both ``>= 0``: the least-squares line, else the best line through 0 (``a`` would be
        negative), else the mean (``b`` would be negative, or the model's seconds do not vary)."""
        x, y = np.asarray(self._model), np.asarray(self._measured)
        spread = float(np.var(x))
        if spread > 1e-12 * float(np.mean(x)) ** 2:
            b = float(np.cov(x, y, bias=True)[0, 1]) / spread
            a = float(y.mean()) - b * float(x.mean())
            if b >= 0 and a >= 0:
                return a, b
            if b > 0:   # (a < 0): through the origin
                return 0.0, float(x @ y) / float(x @ x)
        return float(y.mean()), 0.0


__all__ = ["StepCalibration", "WINDOW", "FIRST"]
