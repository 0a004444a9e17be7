"""Window and frame-selection arithmetic against hand-computed references."""
import numpy as np
import pytest

from lvmae_fast.video.probe import pts_to_seconds
from lvmae_fast.video.windows import frame_range, plan_windows, uniform_index_sample, window_bounds
from fractions import Fraction


@pytest.mark.parametrize("duration,min_last,expected", [
    (12.0, 0.5, [[0, 5], [5, 10]]),                 # 2 s tail < 2.5 s: dropped
    (13.0, 0.5, [[0, 5], [5, 10], [10, 13]]),       # 3 s tail >= 2.5 s: kept, ends at the real end
    (12.0, 0.0, [[0, 5], [5, 10], [10, 12]]),       # min_last 0 keeps any tail
    (13.0, 1.0, [[0, 5], [5, 10]]),                 # min_last 1 drops every partial window
    (10.0, 0.5, [[0, 5], [5, 10]]),                 # exact multiple: no empty tail
    (2.4, 0.5, []),                                 # too short
    (2.5, 0.5, [[0, 2.5]]),
])
def test_window_bounds(duration, min_last, expected):
    got = window_bounds(duration, 5.0, min_last)
    np.testing.assert_allclose(got, np.asarray(expected, dtype=float).reshape(-1, 2))
    assert got.flags.c_contiguous


def test_window_seconds_10_and_15():
    np.testing.assert_allclose(window_bounds(31.0, 10.0), [[0, 10], [10, 20], [20, 30]])
    np.testing.assert_allclose(window_bounds(40.0, 15.0), [[0, 15], [15, 30], [30, 40]])


def test_time_rule_cfr_hand_computed():
    times = np.arange(120) / 10.0                   # 10 fps, 12 s
    plan = plan_windows(times, 12.0, seconds=5.0, frames_per_window=8, rule="time")
    # centres 0.3125 + 0.625 i; frame on screen = floor(10 t)
    assert plan.frames[0].tolist() == [3, 9, 15, 21, 28, 34, 40, 46]
    assert plan.frames[1].tolist() == [53, 59, 65, 71, 78, 84, 90, 96]
    assert len(plan) == 2


def test_index_rule_matches_dali_linspace():
    times = np.arange(120) / 10.0
    plan = plan_windows(times, 12.0, seconds=5.0, frames_per_window=8, rule="index")
    assert plan.ranges.tolist() == [[0, 50], [50, 100]]
    assert plan.frames[0].tolist() == [0, 7, 14, 21, 28, 35, 42, 49]
    assert uniform_index_sample(0, 50, 4).tolist() == [0, 16, 33, 49]
    # DALI docs: 5 frames from a 3-frame range -> [0, 1, 1, 2, 2] (halves round up, not to even)
    assert uniform_index_sample(0, 3, 5).tolist() == [0, 1, 1, 2, 2]
    assert uniform_index_sample(7, 9, 1).tolist() == [7]


def test_vfr_time_vs_index_rules():
    times = np.array([0.0, 0.1, 0.3, 0.35, 0.4, 1.0, 1.2, 1.9])
    t = plan_windows(times, 2.0, seconds=1.0, frames_per_window=4, rule="time")
    # centres .125 .375 .625 .875 -> frames starting at .1 .35 .4 .4; then 1.125.. -> 1.0 1.2 1.2 1.2
    assert t.frames.tolist() == [[1, 3, 4, 4], [5, 6, 6, 6]]
    i = plan_windows(times, 2.0, seconds=1.0, frames_per_window=4, rule="index")
    assert i.ranges.tolist() == [[0, 5], [5, 8]]
    assert i.frames.tolist() == [[0, 1, 3, 4], [5, 6, 6, 7]]


def test_window_without_frames_uses_frame_on_screen():
    times = np.array([0.0, 3.0])                    # a 3 s gap (slide-show style VFR)
    plan = plan_windows(times, 4.0, seconds=1.0, frames_per_window=2, rule="index")
    assert plan.ranges.tolist() == [[0, 1], [0, 1], [0, 1], [1, 2]]
    assert plan.frames.tolist() == [[0, 0], [0, 0], [0, 0], [1, 1]]
    plan = plan_windows(times, 4.0, seconds=1.0, frames_per_window=2, rule="time")
    assert plan.frames.tolist() == [[0, 0], [0, 0], [0, 0], [1, 1]]


def test_boundary_frame_belongs_to_next_window():
    # 30 fps in a 1/90000 time base: frame 150 is exactly at 5 s and must start window 1.
    pts = np.arange(300, dtype=np.int64) * 3000
    times = pts_to_seconds(pts, 0, Fraction(1, 90000))
    assert times[150] == 5.0
    assert frame_range(times, 5.0, 10.0) == (150, 300)
    assert frame_range(times, 0.0, 5.0) == (0, 150)


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_windows(np.zeros(1), 1.0, rule="nearest")
    with pytest.raises(ValueError):
        window_bounds(10.0, 0.0)
