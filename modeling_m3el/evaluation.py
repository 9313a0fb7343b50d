"""Ranking evaluation: the `evaluate` metric module that ships in this package, and its offline loader."""

import os

RANKING_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "m3el_ranking")


def load_ranking_metric(**kwargs):
    """`evaluate.load` of the package's M3EL ranking metric (MR, MRR, Hits@k), from its local folder."""
    import evaluate

    return evaluate.load(RANKING_METRIC_PATH, **kwargs)
