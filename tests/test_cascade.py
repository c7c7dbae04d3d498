"""The cascade's exit rule, threshold choice and cost on fixture probabilities (no model needed)."""
from __future__ import annotations

import numpy as np
import pytest

from mobilevit_deploy.cascade import answering_stage, check_sizes, choose_threshold, simulate
from mobilevit_deploy.errors import UserError


def _probs(rows):
    return np.array(rows, dtype=np.float64)


# 4 images, 2 classes. Stage 1 is confident on images 0 and 1 (right on 0, wrong on 1); stage 2 is right on all.
S1 = _probs([[0.95, 0.05], [0.90, 0.10], [0.60, 0.40], [0.55, 0.45]])
S2 = _probs([[0.80, 0.20], [0.30, 0.70], [0.40, 0.60], [0.20, 0.80]])
Y = np.array([0, 1, 1, 1])


def test_exit_rule_is_max_probability_at_or_above_the_threshold():
    assert answering_stage([S1, S2], 0.90).tolist() == [0, 0, 1, 1]  # 0.90 >= 0.90 exits
    assert answering_stage([S1, S2], 0.91).tolist() == [0, 1, 1, 1]
    assert answering_stage([S1, S2], 1.01).tolist() == [1, 1, 1, 1]  # the last stage always answers


def test_simulate_counts_the_answering_stage():
    o = simulate([S1, S2], Y, 0.91)
    assert o.top1 == 100.0 and o.exit_rates == (0.25, 0.75)
    o = simulate([S1, S2], Y, 0.5)
    assert o.top1 == 25.0 and o.exit_rates == (1.0, 0.0)
    assert o.cost([1.0, 2.0]) == 1.0  # everyone exits after stage 1
    assert simulate([S1, S2], Y, 0.91).cost([1.0, 2.0]) == pytest.approx(1.0 + 0.75 * 2.0)


def test_choose_threshold_is_the_lowest_within_the_allowed_drop():
    c = choose_threshold([S1, S2], Y, max_drop_points=0.5)
    assert c.last_stage_top1 == 100.0
    assert c.threshold == pytest.approx(0.95) and c.outcome.top1 == 100.0 and c.outcome.exit_rates == (0.25, 0.75)
    c = choose_threshold([S1, S2], Y, max_drop_points=30)  # 75 % allowed: image 1 may exit wrongly
    assert c.threshold == pytest.approx(0.90) and c.outcome.top1 == 75.0
    doc = c.to_manifest("val", 4)
    assert doc["exit_rates"] == [0.5, 0.5] and doc["max_drop_points"] == 30


def test_three_stages_share_one_threshold():
    s3 = _probs([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])
    ans = answering_stage([S1, S2, S1], 0.7)
    assert ans.tolist() == [0, 0, 2, 1]  # image 3: 0.8 >= 0.7 at stage 2
    assert simulate([S1, S2, s3], Y, 0.75).exit_rates == (0.5, 0.25, 0.25)


@pytest.mark.parametrize("sizes", [[64], [64, 48], [48, 48], [0, 48]])
def test_bad_sizes_are_one_clear_error(sizes):
    with pytest.raises(UserError, match="--cascade"):
        check_sizes(sizes)


def test_bad_max_drop_and_empty_data():
    with pytest.raises(UserError, match="--max-drop"):
        choose_threshold([S1, S2], Y, max_drop_points=-1)
    with pytest.raises(UserError, match="no exit-data"):
        choose_threshold([S1[:0], S2[:0]], Y[:0])
