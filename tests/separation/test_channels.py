import numpy as np
import pytest

from demix.separation.channels import SQRT_HALF, channel_groups, downmix_matrix


@pytest.mark.parametrize("channels,groups", [
    (1, [[0]]), (2, [[0, 1]]), (3, [[0, 1], [2]]), (6, [[0, 1], [2, 3], [4, 5]]),
    (7, [[0, 1], [2, 3], [4, 5], [6]]),
])
def test_channels_are_separated_by_pair_with_a_last_odd_one_alone(channels, groups):
    assert channel_groups(channels) == groups


def test_the_5_1_downmix_is_itu_bs775():
    matrix = downmix_matrix(6)  # L R C LFE Ls Rs
    frame = np.array([[1.0, 2.0, 3.0, 100.0, 4.0, 5.0]], dtype=np.float32)
    left, right = (frame @ matrix)[0]
    assert left == pytest.approx(1.0 + SQRT_HALF * 3.0 + SQRT_HALF * 4.0)
    assert right == pytest.approx(2.0 + SQRT_HALF * 3.0 + SQRT_HALF * 5.0)  # LFE left out


@pytest.mark.parametrize("channels", range(1, 9))
def test_every_channel_count_up_to_7_1_has_a_downmix(channels):
    matrix = downmix_matrix(channels)
    assert matrix.shape == (channels, 2) and np.isfinite(matrix).all()
