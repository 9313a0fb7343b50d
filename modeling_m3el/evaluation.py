"""Ranking evaluation: gold-entity ranks of a split against the whole KB, and the metrics over them."""

import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch

from .index_m3el import EntityIndex, gather_shares, share_bar
from .modeling_m3el import M3ELModel

RANKING_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "m3el_ranking")


def load_ranking_metric(**kwargs):
    """`evaluate.load` of the package's M3EL ranking metric (MR, MRR, Hits@k), from its local folder."""
    import evaluate

    return evaluate.load(RANKING_METRIC_PATH, **kwargs)


def index_rows(entities) -> list[dict]:
    """Entity rows of a loaded benchmark -> `EntityIndex.build` records (the first image, as in evaluation)."""
    # column by column (a `datasets.Dataset` read row by row costs about 30 microseconds a row: 30 s at 1M entities)
    columns = zip(entities["id"], entities["name"], entities["description"], entities["images"])
    return [{"id": entity_id, "name": name, "description": description, "image": images[0] if images else None}
            for entity_id, name, description, images in columns]


@torch.no_grad()
def gold_ranks(
    model: M3ELModel,
    processor,
    index: EntityIndex,
    mentions,
    batch_size: int = 64,
    accelerator=None,
    progress: bool = True,
    description: str = "Ranking",
    num_workers: int = 0,
    candidates: int | None = None,
) -> np.ndarray:
    """
    Rank of each mention's gold entity among all entities of `index`, in the order of `mentions` (rows with
    `mention`, `sentence`, `image`, `answer`). With an Accelerate `accelerator` of several processes, each process
    ranks a contiguous share and every process receives all the ranks. `num_workers` threads read the images of the
    next batches while the current one is ranked (`M3ELProcessor.prefetched`). `candidates`: the ranks among each
    mention's K candidates instead, a missed gold last (`EntityIndex.rank`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    total = len(mentions)
    if total == 0:
        raise ValueError("no mentions to rank")
    share = -(-total // world)
    start, stop = min(rank * share, total), min((rank + 1) * share, total)
    slices = [mentions[first : min(first + batch_size, stop)] for first in range(start, stop, batch_size)]
    batches = zip(slices, processor.prefetched(
        "mention", ((rows["mention"], rows["sentence"], rows["image"]) for rows in slices), num_workers
    ))
    # in mentions, the unit of the speeds quoted everywhere
    bar = share_bar(description, "mention", stop - start, world) if progress and rank == 0 else None
    local = []
    for rows, inputs in batches:
        features = model.encode(**inputs.to(model.device))
        local.append(index.rank(model, features, rows["answer"], candidates=candidates).cpu())
        if bar is not None:
            bar.update(len(local[-1]))
    if bar is not None:
        bar.close()
    local = torch.cat(local) if local else torch.zeros(0, dtype=torch.long)
    if world > 1:
        local = gather_shares(accelerator, local, share, total).cpu()
    return local.numpy()


def ranking_metrics(ranks: Sequence[int]) -> dict[str, float]:
    """MR, MRR, Hits@1/3/5/10/20 (and the count) through the package's `evaluate` metric module."""
    return load_ranking_metric().compute(ranks=[int(r) for r in ranks])
