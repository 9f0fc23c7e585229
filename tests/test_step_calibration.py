"""The calibration of the chooser's model to the machine a run is on (distattn/train/step_calibration.py)."""

import pytest

from distattn.bench.auto import forecasts
from distattn.train.step_calibration import FIRST, WINDOW, StepCalibration


def _fed(pairs):
    cal = StepCalibration()
    cal.add(1.0, 100.0)   # the run's first step: one-time costs, never fitted
    for model, measured in pairs:
        cal.add(model, measured)
    return cal


def test_uncalibrated_until_enough_steps():
    cal = _fed([])
    assert cal.predict(2e-4) == 2e-4
    for _ in range(FIRST - 1):
        cal.add(1e-4, 0.5)
        assert cal.predict(2e-4) == 2e-4


def test_fits_a_line_of_the_models_seconds():
    cal = _fed([(x, 0.3 + 2000 * x) for x in (1e-4, 2e-4, 3e-4, 5e-4)])
    a, b = cal.fit()
    assert a == pytest.approx(0.3) and b == pytest.approx(2000)
    assert cal.predict(4e-4) == pytest.approx(1.1)


def test_never_a_negative_slope_or_intercept():
    # the machine's step falls where the model's rises: the layouts' differences do not show here
    cal = _fed([(1e-4, 0.6), (2e-4, 0.5), (3e-4, 0.4)])
    assert cal.fit() == pytest.approx((0.5, 0.0))
    # steep enough that the line would cross below 0: through the origin instead
    cal = _fed([(1.0, 0.1), (2.0, 2.0), (3.0, 3.0)])
    a, b = cal.fit()
    assert a == 0.0 and b == pytest.approx((0.1 + 4 + 9) / 14)
    # the same model seconds every step: the mean
    assert _fed([(2e-4, 0.4), (2e-4, 0.6)]).fit() == pytest.approx((0.5, 0.0))


def test_forgets_old_steps():
    cal = _fed([(1e-4, 9.0)] * WINDOW + [(1e-4, 0.5)] * WINDOW)
    assert cal.predict(1e-4) == pytest.approx(0.5)


def test_forecasts_use_only_earlier_steps():
    model = [1e-4, 2e-4, 1e-4, 3e-4, 2e-4]
    measured = [4.0, 0.5, 0.4, 0.7, 0.5]
    got = forecasts(model, measured)
    assert got[:3] == model[:3]   # the first step is never fitted; two steps after it are needed
    assert got[3] == pytest.approx(0.6)   # the line through steps 2 and 3: 0.3 + 1000 * model
    assert got[3] == pytest.approx(_fed([(2e-4, 0.5), (1e-4, 0.4)]).predict(3e-4))
