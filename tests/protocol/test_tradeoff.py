"""The adaptation-against-forgetting axes of the benchmark: update modes and learning rates as grid axes, and the
trade-off points (target against retained source DSC) with their Pareto front."""

from __future__ import annotations

import pytest

from dgst_monai.protocol.grid import Cell, plan_grid
from dgst_monai.protocol.report import paired_table, tradeoff_points, variant_label


def test_update_and_learning_rate_axes_make_named_cells_with_their_overrides():
    cells = plan_grid(methods=["full", "dgst"], shots=[1, 5], seeds=[0], updates=["strict", "gradient"],
                      learning_rates=[1e-4, 1e-3, 1e-2], default_lr=1e-3)
    ids = [c.id for c in cells]
    # the bundle's learning rate (1e-3) and update mode (strict) are the plain cells, not duplicates
    assert "full_1shot_seed0" in ids and "full_1shot_seed0_lr0.001" not in ids
    assert "dgst_5shot_seed0_gamma1_gradient_lr0.0001" in ids and "full_1shot_seed0_gradient" not in ids
    per_method = {m: sum(c.method == m for c in cells) for m in ("full", "dgst")}
    assert per_method == {"full": 2 * 3, "dgst": 2 * 2 * 3}  # full: 2 shots x 3 lrs; dgst: x 2 update modes
    cell = next(c for c in cells if c.id == "dgst_1shot_seed0_gamma1_gradient_lr0.01")
    assert cell.overrides() == {"method": "dgst", "shots": 1, "seed": 0, "gamma": 1, "update": "gradient",
                                "learning_rate": 0.01}
    assert Cell.from_dict(cell.as_dict()) == cell
    with pytest.raises(ValueError, match="update"):
        plan_grid(methods=["dgst"], shots=[1], seeds=[0], updates=["sparse"])
    with pytest.raises(ValueError, match="learning rates"):
        plan_grid(methods=["dgst"], shots=[1], seeds=[0], learning_rates=[0])


def _rows(cell: str, method: str, shots: int, target: list[float], source: list[float], **variant: str):
    base = {"cell": cell, "method": method, "shots": str(shots), "gamma": variant.get("gamma", ""),
            "update": variant.get("update", ""), "lr": variant.get("lr", ""), "iteration": "10"}
    out = []
    for seed in (0,) if method == "foundation" else (0, 1):  # the runner scores the foundation once
        out += [{**base, "seed": str(seed), "domain": "target", "case_id": f"t{i}", "dice": str(v + seed / 100)}
                for i, v in enumerate(target)]
        out += [{**base, "seed": str(seed), "domain": "source", "case_id": f"s{i}", "dice": str(v)}
                for i, v in enumerate(source)]
    return out


def test_tradeoff_points_mark_the_pareto_front_and_place_the_foundation_at_every_shot_level():
    rows = (_rows("foundation", "foundation", 0, [0.2, 0.3], [0.8, 0.9])
            + _rows("full", "full", 5, [0.6, 0.7], [0.4, 0.5])  # adapts most, forgets most
            + _rows("bnh", "bias_norm_head", 5, [0.4, 0.5], [0.7, 0.8])  # keeps the source, adapts less
            + _rows("dgst", "dgst", 5, [0.35, 0.45], [0.6, 0.7], gamma="1")  # dominated by bias_norm_head
            + _rows("dgst_lr", "dgst", 5, [0.65, 0.75], [0.3, 0.4], gamma="1", lr="0.01"))
    points = {p["label"]: p for p in tradeoff_points(rows)}
    assert set(points) == {"Foundation (no fine-tuning)", "Full", "Bias+Norm+Head", "DGST γ=1",
                           "DGST γ=1 lr 0.01"}
    assert {p["shots"] for p in points.values()} == {5}
    assert points["Full"]["seeds"] == [0, 1] and points["Foundation (no fine-tuning)"]["seeds"] == []
    front = {label for label, p in points.items() if p["front"]}
    assert front == {"Foundation (no fine-tuning)", "Full", "Bias+Norm+Head", "DGST γ=1 lr 0.01"}
    mean, low, high = points["Full"]["target"]
    assert mean == pytest.approx(0.655) and low <= mean <= high
    assert points["Bias+Norm+Head"]["retained"][0] == pytest.approx(0.75)
    assert variant_label(("dgst", 10, "gradient", 0.0003)) == "DGST γ=10 gradient lr 0.0003"
    # the retained scores pair up like the target's
    table = paired_table(rows, ["bias_norm_head", "dgst"], "full", [5], lambda m: 1 if m == "dgst" else None,
                         domain="source")
    assert "+30.00" in table.splitlines()[2]  # bias_norm_head retains 30 points more than full on every pair
    # the foundation's one score per case pairs with every seed of a level: 2 seeds x 2 cases on the target
    foundation = paired_table(rows, ["foundation"], "full", [5], lambda m: None)
    assert "-40.50" in foundation and foundation.splitlines()[2].endswith("n 4</ins> |")
    assert points["Foundation (no fine-tuning)"]["target"][0] == pytest.approx(0.25)
