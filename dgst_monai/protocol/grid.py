"""The benchmark grid: which cells (method, shots, seed, gamma, update, learning rate) a run holds, and their names.

The paper's evidence is a grid: Table 1 (methods x shot levels), Table 2 (ablations), Fig. 3 (DGST's gamma).
A cell is one fine-tuning run from the foundation checkpoint plus its evaluation; the reference cell
``foundation`` scores the foundation model itself (no fine-tuning). Sparse methods (those with a selector:
DGST, DRST, SGST) carry their gamma; the table cells use the bundle's default (``finetune.json``'s ``gamma``,
the paper's 1) and the gamma sweep adds DGST cells at the other values.

Two more axes answer "what do I gain, what do I forget": ``updates`` runs every sparse method also with the other
update modes (``strict``: unselected entries untouched, ``gradient``: gradient masking only), and
``learning_rates`` runs every method at each learning rate besides the bundle's. A cell at the bundle's default
(update mode, learning rate) leaves the field None, so its name and its overrides are the plain ones.

Example:
    >>> cells = plan_grid(methods=["full", "dgst"], shots=[5], seeds=[0], gammas=[1, 3], default_gamma=1)
    >>> [c.id for c in cells]
    ['foundation', 'full_5shot_seed0', 'dgst_5shot_seed0_gamma1', 'dgst_5shot_seed0_gamma3']
    >>> [c.id for c in plan_grid(methods=["dgst"], shots=[1], seeds=[0], updates=["gradient"],
    ...                          learning_rates=[0.01], foundation=False)]
    ['dgst_1shot_seed0_gamma1', 'dgst_1shot_seed0_gamma1_gradient', 'dgst_1shot_seed0_gamma1_lr0.01', \
'dgst_1shot_seed0_gamma1_gradient_lr0.01']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = [
    "ABLATION_METHODS",
    "FOUNDATION",
    "TABLE1_METHODS",
    "Cell",
    "format_lr",
    "is_sparse",
    "method_label",
    "plan_grid",
]

#: The paper's Table 1 methods, in its order.
TABLE1_METHODS: tuple[str, ...] = ("scratch", "full", "linear_probe", "bias", "norm", "adapter", "lora", "dgst")
#: The paper's Table 2 ablations beside Full and DGST.
ABLATION_METHODS: tuple[str, ...] = ("encoder", "decoder", "bias_norm", "drst", "sgst")
#: The reference cell: the foundation model evaluated as it is.
FOUNDATION = "foundation"


def is_sparse(method: str) -> bool:
    """Whether a registry method selects entries per step (and so takes a gamma)."""
    from dgst_monai.methods import get_method

    return method != FOUNDATION and get_method(method).selector is not None


def method_label(method: str) -> str:
    """The paper's name of a method (``Full``, ``Bias+Norm``, ...); ``Foundation`` for the reference cell."""
    from dgst_monai.methods import get_method

    return "Foundation (no fine-tuning)" if method == FOUNDATION else get_method(method).label


def format_lr(lr: float) -> str:
    """A learning rate as short as it reads (``0.01``, ``0.0003``, ``1e-05``): the same text in names and labels."""
    return repr(float(lr))


@dataclass(frozen=True)
class Cell:
    """One cell of the grid.

    Attributes:
        method: a ``dgst_monai.METHODS`` name, or ``foundation`` (no fine-tuning; shots 0).
        shots: number of annotated target cases.
        seed: few-shot draw and training seed.
        gamma: entries kept per group (sparse methods only, else None).
        update: the sparse update mode when it is not the bundle's (``gradient``), else None.
        lr: the learning rate when it is not the bundle's, else None.
    """

    method: str
    shots: int
    seed: int
    gamma: int | None = None
    update: str | None = None
    lr: float | None = None

    @property
    def id(self) -> str:
        """Folder name: ``<method>_<k>shot_seed<s>[_gamma<g>][_<update>][_lr<lr>]``, or ``foundation``."""
        if self.method == FOUNDATION:
            return FOUNDATION
        return f"{self.method}_{self.shots}shot_seed{self.seed}{self.variant_suffix}"

    @property
    def variant_suffix(self) -> str:
        """What sets this cell apart from its method's other cells of a shot level and seed (part of :attr:`id`)."""
        parts = [f"gamma{self.gamma}" if self.gamma is not None else "", self.update or "",
                 f"lr{format_lr(self.lr)}" if self.lr is not None else ""]
        return "".join(f"_{p}" for p in parts if p)

    def overrides(self) -> dict[str, Any]:
        """The finetune config's overrides that make this cell (``method``, ``shots``, ``seed`` and, where set,
        ``gamma``, ``update``, ``learning_rate``)."""
        out: dict[str, Any] = {"method": self.method, "shots": self.shots, "seed": self.seed}
        for key, value in (("gamma", self.gamma), ("update", self.update), ("learning_rate", self.lr)):
            if value is not None:
                out[key] = value
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON form (:meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        """The cell of :meth:`as_dict`."""
        lr = data.get("lr")
        return cls(str(data["method"]), int(data["shots"]), int(data["seed"]), data.get("gamma"), data.get("update"),
                   None if lr is None else float(lr))


def _names(values: Iterable[str], what: str) -> list[str]:
    from dgst_monai.methods import METHODS

    out = []
    for v in values:
        if v not in METHODS:
            raise ValueError(f"{what}: unknown method {v!r}; known: {', '.join(METHODS)}")
        if v not in out:
            out.append(v)
    return out


def plan_grid(
    *,
    methods: Iterable[str],
    shots: Iterable[int],
    seeds: Iterable[int],
    ablation: Iterable[str] = (),
    gammas: Iterable[int] = (),
    default_gamma: int = 1,
    updates: Iterable[str] = (),
    default_update: str = "strict",
    learning_rates: Iterable[float] = (),
    default_lr: float | None = None,
    foundation: bool = True,
) -> list[Cell]:
    """All cells of a run, without duplicates, in run order (foundation, then per method, shots, seed).

    Args:
        methods: Table 1 methods.
        shots: shot levels.
        seeds: seeds (few-shot draw and training).
        ablation: Table 2 methods (run beside ``methods``).
        gammas: DGST gamma values of the sensitivity sweep (DGST cells at each value, every shot level and seed).
        default_gamma: gamma of the sparse methods in the tables (the bundle's default).
        updates: update modes each sparse cell is also run with (``strict``, ``gradient``).
        default_update: the bundle's update mode (its cells leave ``update`` None).
        learning_rates: learning rates every cell is also run with.
        default_lr: the bundle's learning rate (its cells leave ``lr`` None).
        foundation: include the ``foundation`` reference cell.

    Raises:
        ValueError: an unknown method or update mode, no shot level, no seed, a shot level / gamma below 1 or a
            learning rate not above 0.
    """
    from dgst_monai.sparsity import UPDATE_MODES

    table = _names(methods, "--methods") + [m for m in _names(ablation, "--ablation") if m not in methods]
    shot_list, seed_list = [int(k) for k in shots], [int(s) for s in seeds]
    gamma_list = [int(g) for g in gammas]
    if not shot_list or not seed_list:
        raise ValueError("a benchmark needs at least one shot level (--shots) and one seed (--seeds)")
    if any(k < 1 for k in shot_list) or any(g < 1 for g in gamma_list):
        raise ValueError(f"shot levels and gammas must be >= 1, got shots {shot_list} and gammas {gamma_list}")
    cells: list[Cell] = [Cell(FOUNDATION, 0, 0)] if foundation else []
    for method in table:
        gamma = default_gamma if is_sparse(method) else None
        cells += [Cell(method, k, s, gamma) for k in shot_list for s in seed_list]
    cells += [Cell("dgst", k, s, g) for g in gamma_list for k in shot_list for s in seed_list]
    update_list = [str(u) for u in updates]
    if any(u not in UPDATE_MODES for u in update_list):
        raise ValueError(f"--update {update_list}: each must be one of {', '.join(UPDATE_MODES)}")
    lr_list = [float(v) for v in learning_rates]
    if any(not v > 0 for v in lr_list):
        raise ValueError(f"--lr {lr_list}: learning rates must be > 0")
    variants = [None if u == default_update else u for u in update_list]
    cells += [replace(c, update=u) for c in list(cells) if c.gamma is not None for u in variants]
    rates = [None if default_lr is not None and math.isclose(v, default_lr) else v for v in lr_list]
    cells += [replace(c, lr=v) for c in list(cells) if c.method != FOUNDATION for v in rates]
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.id, cell)
    return list(unique.values())
