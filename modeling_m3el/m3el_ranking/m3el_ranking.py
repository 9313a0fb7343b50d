"""M3EL ranking metric: MR, MRR and Hits@k of gold-entity ranks, as an `evaluate` module (loads offline by path)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Entity-linking ranking metrics over the rank of each mention's gold entity among all entities of the knowledge
base (rank 1 is best; ties count against the gold, see the M3EL spec section 6): mean rank (MR), mean reciprocal
rank (MRR) and Hits@k, the fraction of mentions whose gold entity ranks in the top k, for k in 1, 3, 5, 10, 20.
"""

_KWARGS_DESCRIPTION = """
Args:
    ranks (`list[int]`): 1-based rank of the gold entity, one per mention (mentions with a `nil` answer excluded).
    hits_at (`list[int]`, *optional*, defaults to `[1, 3, 5, 10, 20]`): the k of the Hits@k to report.
Returns:
    `mr`, `mrr`, `hits@k` for each k (fractions in [0, 1]), and `count`, the number of ranks.
Example:
    >>> metric = evaluate.load("path/to/m3el_ranking")
    >>> metric.compute(ranks=[1, 2, 10])["mrr"]
    0.5333333333333333
"""

_CITATION = """
@inproceedings{hu2025m3el,
  title={Multi-level Matching Network for Multimodal Entity Linking},
  author={Hu, Zhiwei and Guti{\\'e}rrez-Basulto, V{\\'i}ctor and Li, Ru and Pan, Jeff Z.},
  booktitle={Proceedings of the 31st ACM SIGKDD Conference on Knowledge Discovery and Data Mining},
  year={2025}
}
"""

DEFAULT_HITS_AT = (1, 3, 5, 10, 20)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class M3ELRanking(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"ranks": datasets.Value("int64")}),
        )

    def _compute(self, ranks, hits_at=DEFAULT_HITS_AT):
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.size == 0:
            raise ValueError("no ranks to score: every mention was nil or the split is empty")
        if ranks.min() < 1:
            raise ValueError(f"ranks are 1-based; got {int(ranks.min())}")
        results = {"mr": float(ranks.mean()), "mrr": float((1.0 / ranks).mean())}
        for k in hits_at:
            results[f"hits@{k}"] = float((ranks <= k).mean())
        results["count"] = int(ranks.size)
        return results
