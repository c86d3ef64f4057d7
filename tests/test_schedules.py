import math

import pytest

from lightning_compress.schedules import (
    Constant,
    Cubic,
    Exponential,
    Linear,
    OneShot,
    Polynomial,
    resolve_schedule,
)


def zhu_gupta(t: int, t0: int, t1: int, s_i: float, s_f: float) -> float:
    t = min(max(t, t0), t1)
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3


@pytest.mark.parametrize("step", [0, 5, 10, 37, 99, 100, 150])
def test_cubic_matches_zhu_gupta(step: int) -> None:
    got = Cubic()(step + 10, start=10, end=110, initial=0.1, final=0.9)
    assert got == pytest.approx(zhu_gupta(step + 10, 10, 110, 0.1, 0.9))


@pytest.mark.parametrize(
    "schedule", [Cubic(), Linear(), Exponential(), Exponential(rate=0.5), Polynomial(1.5), OneShot()]
)
def test_monotone_and_bounded(schedule) -> None:
    values = [schedule(s, start=5, end=50, initial=0.0, final=0.8) for s in range(0, 80)]
    assert values[0] == 0.0 and values[4] == 0.0  # before start
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))
    assert values[50] == pytest.approx(0.8) and values[-1] == pytest.approx(0.8)


def test_linear_and_exponential_shapes() -> None:
    assert Linear()(25, start=0, end=100, initial=0.0, final=1.0) == 0.25
    e = Exponential(rate=3.0)(50, start=0, end=100, initial=0.0, final=1.0)
    assert e == pytest.approx((1 - math.exp(-1.5)) / (1 - math.exp(-3.0)))


def test_constant_and_one_shot() -> None:
    assert Constant()(0, start=10, end=20, initial=0.0, final=0.5) == 0.5
    assert OneShot()(9, start=10, end=20, initial=0.0, final=0.5) == 0.0
    assert OneShot()(10, start=10, end=20, initial=0.0, final=0.5) == 0.5


@pytest.mark.parametrize("bad", ["cosine", 3, None])
def test_resolve_rejects_unknown(bad) -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        resolve_schedule(bad)


@pytest.mark.parametrize(
    "cls,kw",
    [(Exponential, {"rate": 0}), (Exponential, {"rate": -1}), (Polynomial, {"power": -1}), (Polynomial, {"power": 0})],
)
def test_bad_parameters(cls, kw) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        cls(**kw)
