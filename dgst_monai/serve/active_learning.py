"""Which study to contour next: MONAI Label active-learning strategies computed by the served model.

``POST /activelearning/entropy`` returns the unlabelled study whose predicted lymph nodes the served model is
least sure of: the mean binary entropy of its foreground probability over the voxels it predicts as node
(:func:`node_entropy`; 0 when it predicts none). Scores are cached per study and weights, so a study is
segmented once per fine-tune. ``POST /activelearning/random`` is MONAI Label's own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

__all__ = ["NodeEntropy", "node_entropy"]

logger = logging.getLogger(__name__)


def node_entropy(probability: np.ndarray) -> float:
    """Mean binary entropy (bits) of the foreground probability over the voxels predicted as node (p > 0.5).

    1.0 where every predicted voxel sits at p = 0.5, 0.0 where the model is certain (or predicts no node).
    """
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-12, 1 - 1e-12)
    nodes = p > 0.5
    if not nodes.any():
        return 0.0
    q = p[nodes]
    return float(np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))))


class NodeEntropy(Strategy):
    """The unlabelled study with the highest :func:`node_entropy` under the served weights.

    Args:
        weights: ``model name -> id of its served weights`` (a new fine-tune invalidates the cached scores).
        probabilities: ``(model name, study path) -> foreground probability array``, the served model's softmax.
        default_model: the model used when the request names none.
    """

    def __init__(
        self,
        weights: Callable[[str], str],
        probabilities: Callable[[str, str], np.ndarray],
        default_model: str,
    ) -> None:
        super().__init__("Mean entropy of the served model's foreground probability over its predicted nodes")
        self.weights = weights
        self.probabilities = probabilities
        self.default_model = default_model
        self.scores: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def score(self, model: str, study: str, datastore: Datastore) -> float:
        """The study's score under the model's served weights, computed once per (study, weights)."""
        with self._lock:
            key = (model, study, self.weights(model))
            if key not in self.scores:
                self.scores[key] = node_entropy(self.probabilities(model, datastore.get_image_uri(study)))
            return self.scores[key]

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        from dgst_monai.serve.scans import ScanError, check_study

        model = str(request.get("model") or self.default_model)
        scores, unreadable = {}, {}
        for image in images:
            try:
                check_study(datastore.get_image_uri(image))  # a damaged study is named, never scored as zeros
            except ScanError as err:
                unreadable[image] = str(err)
                continue
            scores[image] = self.score(model, image, datastore)
        if not scores:
            return None
        best = max(sorted(scores), key=lambda image: scores[image])
        logger.info(f"entropy: {scores}; next {best}; unreadable {unreadable}")
        return {"id": best, "score": scores[best], "scores": scores, "unreadable": unreadable, "model": model}
