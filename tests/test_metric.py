"""The evaluate metric module: loads offline by path, and computes MR, MRR and Hits@k from gold ranks."""

import pytest

from modeling_m3el.evaluation import load_ranking_metric


@pytest.fixture(scope="module")
def metric():
    return load_ranking_metric()


def test_values_from_ranks(metric, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ranks = [1, 2, 3, 7, 25]
    result = metric.compute(ranks=ranks)
    assert result["count"] == 5
    assert result["mr"] == pytest.approx(38 / 5)
    assert result["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 7 + 1 / 25) / 5)
    expected_hits = {1: 1 / 5, 3: 3 / 5, 5: 3 / 5, 10: 4 / 5, 20: 4 / 5}
    for k, value in expected_hits.items():
        assert result[f"hits@{k}"] == pytest.approx(value)


def test_batches_accumulate(metric):
    metric.add_batch(ranks=[1, 1])
    metric.add_batch(ranks=[4])
    result = metric.compute(hits_at=[1, 4])
    assert result == {"mr": 2.0, "mrr": pytest.approx(0.75), "hits@1": pytest.approx(2 / 3), "hits@4": 1.0, "count": 3}


def test_bad_ranks_are_refused(metric):
    with pytest.raises(ValueError, match="1-based"):
        metric.compute(ranks=[0, 1])
