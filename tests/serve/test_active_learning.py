"""Active learning: the entropy strategy returns the unlabelled study whose predicted nodes are least certain.

The studies are real files in MONAI Label's own local datastore; the model's foreground probabilities are
constructed per study (certain nodes, uncertain nodes, no node), so which study is least certain is known.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from monailabel.datastore.local import LocalDatastore

import dgst_monai.serve  # noqa: F401 - MONAI Label under pydicom 3
from dgst_monai.serve.active_learning import NodeEntropy, node_entropy


def test_node_entropy_orders_certain_uncertain_and_empty_predictions():
    certain, uncertain, empty = np.full(100, 0.99), np.full(100, 0.6), np.full(100, 0.01)
    assert node_entropy(uncertain) > node_entropy(certain) > 0 == node_entropy(empty)
    assert abs(node_entropy(np.full(10, 0.5 + 1e-9)) - 1.0) < 1e-6


def test_entropy_strategy_picks_the_least_certain_unlabelled_study_and_caches_scores(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("certain", "uncertain", "empty", "labelled"):
        sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(studies / f"{name}.nii.gz"))
    store = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    store.save_label("labelled", str(studies / "labelled.nii.gz"), "final", {})
    maps = {"certain": 0.99, "uncertain": 0.62, "empty": 0.02, "labelled": 0.5}
    calls: list[str] = []

    def probabilities(model: str, path: str) -> np.ndarray:
        name = path.rsplit("/", 1)[-1].split(".")[0]
        calls.append(name)
        return np.full((8, 8, 8), maps[name])

    weights = {"m": "foundation"}
    strategy = NodeEntropy(lambda m: weights[m], probabilities, default_model="m")
    chosen = strategy({}, store)
    assert chosen["id"] == "uncertain" and set(chosen["scores"]) == {"certain", "uncertain", "empty"}
    assert strategy({}, store)["id"] == "uncertain" and len(calls) == 3  # cached per study and weights
    weights["m"] = "finetune-1"  # new weights: scored again
    strategy({}, store)
    assert len(calls) == 6
