"""Parameter accounting: how much of the network each fine-tuning method trains, and how much actually changed.

For every registry method on a given network: the entries it trains (``requires_grad``), the entries it adds
(LoRA, adapters, the spatial adapter), an upper bound on the foundation entries one optimizer step can change,
the same bound after ``steps`` steps, and, given (foundation, fine-tuned) state dicts, the entries that really changed.
Fractions are of the foundation network's entries (parameters, aliases counted once).

The bounds assume strict updates (``update="strict"`` for the sparsification methods): a strict DGST / DRST /
SGST step changes at most ``gamma`` entries per group of every kernel plus the always-trained biases,
normalization affines and heads, so after N steps at most ``min(N * gamma, group size)`` entries per group.
In ``"gradient"`` mode momentum and weight decay void that bound. A merged LoRA rewrites its target
convolutions whole; adapters and the spatial adapter stay beside the foundation, which they leave as it is
(apart from the heads, which the adapter method trains).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dgst_monai.delta import changed_mask
from dgst_monai.methods import METHODS, SelectionOptions, clone_network, get_method
from dgst_monai.roles import describe_parameters
from dgst_monai.sparsity import Grouping, Selector, group_rows


@dataclass(frozen=True)
class MethodAccount:
    """One row of the table.

    Attributes:
        method: registry name.
        label: the paper's name.
        network_entries: entries of the foundation network (the denominator of every fraction).
        trainable_entries: entries with ``requires_grad`` under the method, added modules included.
        added_entries: entries the method adds to the network (LoRA / adapter weights), 0 for the others.
        step_bound: at most this many foundation entries change in one optimizer step (merged, strict mode).
        steps: the N of :attr:`steps_bound`, or None.
        steps_bound: at most this many foundation entries change after ``steps`` steps.
        changed_entries: foundation entries that differ between the given base and tuned state dicts.
        note: why the method does not apply to this network, if it does not.
    """

    method: str
    label: str
    network_entries: int
    trainable_entries: int | None = None
    added_entries: int = 0
    step_bound: int | None = None
    steps: int | None = None
    steps_bound: int | None = None
    changed_entries: int | None = None
    note: str = ""

    @property
    def trainable_fraction(self) -> float | None:
        """Trainable entries / foundation entries (above 1 is possible for LoRA on a tiny network)."""
        return None if self.trainable_entries is None else self.trainable_entries / self.network_entries

    @property
    def changed_fraction(self) -> float | None:
        """Changed entries / foundation entries."""
        return None if self.changed_entries is None else self.changed_entries / self.network_entries

    @property
    def steps_fraction(self) -> float | None:
        """:attr:`steps_bound` / foundation entries."""
        return None if self.steps_bound is None else self.steps_bound / self.network_entries


def count_changed(
    base_state: Mapping[str, torch.Tensor], tuned_state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> int:
    """Entries that differ bitwise between two state dicts, over ``names`` (default: every shared key).

    Pass ``names=dict(network.named_parameters())`` to count each parameter once: a DynUNet state dict lists
    its encoder and decoder twice (``skip_layers.*``).

    Raises:
        KeyError: a name is missing from either state dict.

    Example::

        count_changed(foundation.state_dict(), tuned.state_dict(), dict(foundation.named_parameters()))
    """
    keys = list(names) if names is not None else [k for k in tuned_state if k in base_state]
    missing = [k for k in keys if k not in base_state or k not in tuned_state]
    if missing:
        raise KeyError(f"not in both state dicts (merge LoRA / adapters before counting): {missing[:5]}")
    return sum(int(changed_mask(base_state[k], tuned_state[k]).sum()) for k in keys)


def account_methods(
    network: nn.Module,
    methods: Iterable[str] | None = None,
    *,
    gamma: int = 1,
    grouping: Grouping = "filter",
    steps: int | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None,
    tuned_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> list[MethodAccount]:
    """One :class:`MethodAccount` per method on ``network`` (which is left untouched).

    Args:
        network: the plain foundation network (e.g. the bundle's ``network_def``).
        methods: registry names; default all of ``dgst_monai.METHODS``.
        gamma: entries kept per group by dgst / drst / sgst.
        grouping: ``"filter"`` or ``"kernel"``.
        steps: also bound the entries changed after this many optimizer steps.
        base_state: the foundation state dict, to count changed entries.
        tuned_states: ``{method: fine-tuned plain state dict}`` (merged), to count changed entries against
            ``base_state``.

    Returns:
        Rows in the order of ``methods``; a method that cannot apply to the network (e.g. encoder without a
        registered layout) gets a row with only a ``note``.

    Example::

        rows = account_methods(net, steps=250, base_state=foundation, tuned_states={"dgst": tuned})
        print(format_table(rows))
    """
    SelectionOptions(gamma=gamma, grouping=grouping)  # validates them
    names = list(methods) if methods is not None else list(METHODS)
    params = dict(network.named_parameters())
    infos = describe_parameters(network)
    total = sum(p.numel() for p in params.values())
    tuned_states = dict(tuned_states or {})
    if tuned_states and base_state is None:
        raise ValueError("tuned_states need base_state to count changed entries against")
    rows = []
    for name in names:
        method = get_method(name)
        try:
            if method.prepare is not None:
                trainable, added, changeable = _injected_counts(network, name)
                step_bound = steps_bound = changeable
            else:
                flags = method.trainable(network)
                trainable, added = sum(params[n].numel() for n, f in flags.items() if f), 0
                if method.selector is None:
                    step_bound = steps_bound = trainable
                else:
                    step_bound = _selection_bound(params, infos, flags, gamma, grouping, 1)
                    effective = steps or 1
                    if name == "sgst":
                        effective = 1  # one mask, fixed before the first update: at most gamma entries per group
                    steps_bound = _selection_bound(params, infos, flags, gamma, grouping, effective)
        except ValueError as error:
            rows.append(MethodAccount(name, method.label, total, note=str(error)))
            continue
        changed = None
        if name in tuned_states:
            changed = count_changed(base_state, tuned_states[name], params)  # type: ignore[arg-type]
        rows.append(
            MethodAccount(
                name,
                method.label,
                total,
                trainable_entries=trainable,
                added_entries=added,
                step_bound=step_bound,
                steps=steps,
                steps_bound=steps_bound if steps is not None else None,
                changed_entries=changed,
            )
        )
    return rows


def _selection_bound(
    params: Mapping[str, nn.Parameter],
    infos: Mapping[str, object],
    flags: Mapping[str, bool],
    gamma: int,
    grouping: Grouping,
    steps: int,
) -> int:
    bound = 0
    for name, trains in flags.items():
        if not trains:
            continue
        param = params[name]
        if Selector.is_sparse(infos[name]):  # type: ignore[arg-type]
            rows = group_rows(param.detach(), grouping)
            bound += rows.shape[0] * min(rows.shape[1], steps * gamma)
        else:
            bound += param.numel()
    return bound


def _injected_counts(network: nn.Module, method: str) -> tuple[int, int, int]:
    from dgst_monai.networks.adapters import merged_parameter_names

    plain = dict(network.named_parameters())
    injected = get_method(method).apply(clone_network(network))
    params = dict(injected.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    added = sum(p.numel() for p in params.values()) - sum(p.numel() for p in plain.values())
    # merging rewrites LoRA's targets whole; the heads train directly (a wrapper renames them: none count)
    heads = {n for n, p in params.items() if p.requires_grad and n in plain}
    changeable = set(merged_parameter_names(injected)) | heads
    return trainable, added, sum(plain[n].numel() for n in changeable if n in plain)


def format_table(rows: Iterable[MethodAccount]) -> str:
    """The rows as one text table (what ``dgst-monai methods --network ...`` prints).

    Example::

        print(format_table(account_methods(net, steps=250)))
    """
    rows = list(rows)
    steps = next((r.steps for r in rows if r.steps is not None), None)
    show_changed = any(r.changed_entries is not None for r in rows)
    header = ["method", "label", "trainable", "%", "added", "per step <=", "%"]
    if steps is not None:
        header += [f"after {steps} steps <=", "%"]
    if show_changed:
        header += ["changed", "%"]
    table = [header]
    for r in rows:
        if r.trainable_entries is None:
            table.append([r.method, r.label, f"n/a: {r.note}"])
            continue
        line = [
            r.method,
            r.label,
            f"{r.trainable_entries:,}",
            _pct(r.trainable_fraction),
            f"{r.added_entries:,}",
            f"{r.step_bound:,}",
            _pct(None if r.step_bound is None else r.step_bound / r.network_entries),
        ]
        if steps is not None:
            line += [f"{r.steps_bound:,}", _pct(r.steps_fraction)]
        if show_changed:
            line += ["-", ""] if r.changed_entries is None else [f"{r.changed_entries:,}", _pct(r.changed_fraction)]
        table.append(line)
    full_lines = [line for line in table if len(line) == len(header)]
    widths = [max(len(line[i]) for line in full_lines) for i in range(len(header))]
    out = []
    for line in table:
        if len(line) != len(header):  # a "n/a" row spans the numeric columns
            out.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]}")
            continue
        cells = [f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
    total = rows[0].network_entries if rows else 0
    bound_note = "bounds on foundation entries changed: strict updates for dgst/drst/sgst, merged for lora"
    out.append(f"{total:,} foundation entries; {bound_note}")
    return "\n".join(out)


def _pct(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction:.4%}"
