"""The numbers beside the report's pictures, on hand-made maps and images whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from cnnjax.visualize import checks


def _digit() -> np.ndarray:
    """A 28x28 'one': a vertical bar 3 px wide, full ink, on black; plus one faint edge pixel."""
    img = np.zeros((28, 28))
    img[6:22, 12:15] = 1.0
    img[5, 13] = 0.3  # anti-aliasing: below the ink threshold, covered by the dilation
    return img


def test_the_stroke_mask_is_the_ink_dilated_by_one_pixel():
    mask = checks.stroke_mask(_digit()[None, ..., None])[0]
    assert mask.shape == (28, 28)
    assert mask[5:23, 11:16].all() and mask.sum() == 18 * 5  # 16x3 bar grown to 18x5
    assert not checks.stroke_mask(_digit()[None], dilate=0)[0, 5, 13]


def test_a_map_that_is_exactly_the_stroke_scores_one_and_a_uniform_map_its_area():
    mask = checks.stroke_mask(_digit()[None])
    exact = checks.localization(mask.astype(float), mask)
    assert exact.pointing == 1.0 and exact.mass == 1.0 and exact.coverage == 1.0
    assert np.isclose(exact.uniform_mass, 90 / 784) and exact.uniform_pointing == exact.uniform_mass
    uniform = checks.localization(np.ones((1, 28, 28)), mask)
    assert np.isclose(uniform.mass, 90 / 784) and uniform.coverage == 1.0
    speck = np.zeros((1, 28, 28))
    speck[0, 10, 13] = 1.0  # one hot pixel on the stroke: pointing and mass cannot tell...
    found = checks.localization(speck, mask)
    assert found.pointing == 1.0 and found.mass == 1.0
    assert np.isclose(found.coverage, 1 / 90)  # ...the coverage can


def test_an_off_stroke_or_empty_map_scores_zero_and_half_on_half_off_scores_half():
    mask = checks.stroke_mask(_digit()[None])
    off = np.zeros((1, 28, 28))
    off[0, 0, 0] = 1.0  # a single hot spot in the corner
    found = checks.localization(off, mask)
    assert found.pointing == 0.0 and found.mass == 0.0 and found.coverage == 0.0
    empty = checks.localization(np.zeros((1, 28, 28)), mask)  # no maximum: a miss, no mass
    assert empty.pointing == 0.0 and empty.mass == 0.0
    half = np.zeros((2, 28, 28))
    half[:, 10, 13] = 2.0  # peak on the stroke...
    half[:, 0, 0] = 2.0 - 1e-3  # ...and nearly as much in the corner
    both = checks.localization(half, np.repeat(mask, 2, axis=0))
    assert both.pointing == 1.0 and np.isclose(both.mass, 2.0 / (4.0 - 1e-3))
    with pytest.raises(ValueError, match="non-negative"):
        checks.localization(-np.ones((1, 28, 28)), mask)


def test_a_checkerboard_has_its_energy_above_half_nyquist_and_a_slow_wave_none():
    rows, cols = np.indices((28, 28))
    checker = ((rows + cols) % 2).astype(float)
    slow = 0.5 + 0.5 * np.cos(2 * np.pi * 3 * cols / 28)  # 3/28 cycles per pixel, below 0.25
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * 8 * cols / 28)  # 8/28 = 0.286, just above
    share = checks.high_frequency_share(np.stack([checker, slow, stripes])[..., None])
    np.testing.assert_allclose(share, [1.0, 0.0, 1.0], atol=1e-12)
    mixed = checks.high_frequency_share((0.5 * checker + slow)[None, ..., None])[0]
    high, low = 0.25 ** 2, 0.5 ** 2 / 2  # by Parseval, mean squares of the two zero-mean parts
    np.testing.assert_allclose(mixed, high / (high + low))  # 1/3
    assert checks.high_frequency_share(np.full((1, 28, 28, 1), 0.7))[0] == 0.0  # flat: no energy


def test_saturation_counts_pixels_within_two_percent_of_either_bound():
    lo, hi = -0.42, 2.82  # mnist's normalized pixel range
    img = np.full((1, 10, 10, 1), (lo + hi) / 2)
    img[0, 0, :5] = lo  # 5 at the bottom
    img[0, 1, :3] = hi - 0.01 * (hi - lo)  # 3 within 2% of the top
    img[0, 2, :4] = hi - 0.05 * (hi - lo)  # 4 not
    assert checks.saturation(img, (lo, hi))[0] == 0.08
    assert checks.saturation(np.clip(10 * img, lo, hi), (lo, hi))[0] == 1.0  # clipped: all of it
