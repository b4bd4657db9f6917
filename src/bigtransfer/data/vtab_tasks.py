"""VTAB-1k's tasks as data: names, groups, the paper's augmentation exceptions, and the score.

Plain data and pure functions (no torch), so the CLI can list the tasks in `--help` instantly and
reports can aggregate scores without importing the protocol that produced them.
"""

from __future__ import annotations

import statistics

from ..errors import BigTransferError

GROUPS = {
    "natural": ("caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-xpos",
                   "dsprites-orientation", "smallnorb-azimuth", "smallnorb-elevation"),
}
TASKS = tuple(task for tasks in GROUPS.values() for task in tasks)
GROUP_OF = {task: group for group, tasks in GROUPS.items() for task in tasks}
# Supp. F: orientation/azimuth and x-position labels change under a mirror; counts, distances and
# locations change under a crop (dsprites-xpos is the paper's "dSprites-location").
NO_FLIP = frozenset({"dsprites-orientation", "smallnorb-azimuth", "dsprites-xpos"})
NO_CROP = frozenset({"clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-xpos"})
TRAIN_SIZE, VAL_SIZE = 800, 200


def augmentation(task: str) -> dict[str, bool]:
    """The flip/crop switches the paper uses for `task`."""
    return {"flip": task not in NO_FLIP, "random_crop": task not in NO_CROP}


def aggregate(task_scores: dict[str, float]) -> dict:
    """Per-group means and the overall mean over the tasks present (VTAB: the mean over all 19)."""
    unknown = sorted(set(task_scores) - set(TASKS))
    if unknown:
        raise BigTransferError(f"unknown VTAB task {unknown[0]!r}")
    groups = {g: statistics.mean(task_scores[t] for t in tasks if t in task_scores)
              for g, tasks in GROUPS.items() if any(t in task_scores for t in tasks)}
    return {"tasks": dict(task_scores), "groups": groups,
            "mean": statistics.mean(task_scores.values()) if task_scores else None,
            "complete": set(task_scores) == set(TASKS)}
