"""Speed and memory of the DGST engine against full fine-tuning and the released trainer's construction.

What is timed is fine-tuning as the ``ln_ct_dynunet`` bundle runs it: a real MONAI ``SupervisedTrainer``
with :class:`dgst_monai.DGSTHandler` attached, the network of a ``dgst_monai.networks`` plan (default: the
paper's nnU-Net-sized DynUNet, ``plan_preset("paper")``: filters 32-64-128-256-320-320, 3x3x1 first kernel,
strides [1,1,1] [2,2,1] [2,2,2] [2,2,2] [2,2,2] [2,1,2], affine instance norm, 3 deep-supervision heads), and
the bundle's own loss and optimizer (``train.json`` + ``finetune.json``: deep-supervision DiceCE, SGD lr 1e-3,
momentum 0.99, Nesterov, weight decay 3e-5), on a fixed synthetic batch. It measures:

1. Iteration time of each mode, side by side in one process, modes interleaved round-robin (one
   ``trainer.run()`` of one iteration per mode and round) so that machine drift hits all of them equally.
   Each mode has its own trainer, network copy (same initial weights) and optimizer. The phases of an
   iteration are read from the trainer's own events::

       ITERATION_STARTED -> forward (batch, zero_grad, forward) -> FORWARD_COMPLETED -> loss -> LOSS_COMPLETED
         -> backward -> BACKWARD_COMPLETED -> handler (clip, select, mask) -> optimizer.step()
         -> MODEL_COMPLETED -> handler (after_step: restore) -> ITERATION_COMPLETED

   ``full`` is ``DGSTHandler(method="full")`` (gradient clipping only). ``dgst-strict`` / ``dgst-gradient`` are
   ``DGSTHandler(method="dgst", update=...)``. ``released-gN`` clips and masks gradients with a
   re-implementation of the released trainer's construction (:func:`released_masks`) in a handler on the same
   event. A ``-gN`` suffix sets gamma (default 1).
2. The selection alone, on the same real gradients (one backward of the network): ``GradientSelector()``
   against :func:`released_masks`, median over repeats, gamma 1 and 2, and whether both select the same entries;
   and the update side (``SparseUpdate.before_step``, ``optimizer.step()``, ``SparseUpdate.after_step``).
3. Peak memory of each mode, each in a fresh subprocess (peak RSS only grows within a process): when the
   trainer starts (after the handler's set-up) the peak RSS is reset to the current RSS
   (``/proc/self/clear_refs``), then the growth of the peak RSS over that RSS during ``--memory-iterations``
   iterations is the mode's peak training memory. Measured twice: with glibc malloc as is, and with a fixed
   64 KiB mmap threshold so that freed tensors leave the RSS at once and the peak follows live tensors rather
   than heap fragmentation.

Usage::

    python benchmarks/bench_dgst.py --json bench.json             # nnU-Net-sized, an estimated 15-20 min on 2 CPU cores
    python benchmarks/bench_dgst.py --size tiny                    # smoke run, a few minutes (mostly imports)
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from dgst_monai import DGSTHandler
from dgst_monai.memory import peak_rss_mb, reset_peak_rss, rss_mb
from dgst_monai.networks import DynUNetPlan, plan_preset
from dgst_monai.sparsity import GradientSelector, SparseUpdate

#: The bundle whose fine-tuning loss and optimizer are timed.
BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "ln_ct_dynunet"
SIZES: dict[str, dict[str, Any]] = {
    # nnU-Net-sized: the paper's plan at a 96x96x64 patch (x, y, z; nnU-Net's 64x96x96 in z, y, x)
    "nnunet": {"plan": "paper", "patch": [96, 96, 64], "iterations": 5, "warmup": 1},
    # smoke run: the cpu-small plan with filters 8-16-32-64
    "tiny": {
        "plan": "cpu-small",
        "plan_overrides": {"base_filters": 8},
        "patch": [48, 48, 32],
        "iterations": 3,
        "warmup": 1,
        "selection_repeats": 5,
        "released_repeats": 3,
    },
}
DEFAULT_MODES = "full,dgst-strict,dgst-gradient,dgst-strict-g2,dgst-gradient-g2,released-g2"
#: Phases of one trainer iteration, between consecutive events (see the module docstring).
PHASES = ("forward", "loss", "backward", "clip_select_mask", "step", "after_step")
#: Phases that the fine-tuning method's handler spends (for ``full``: gradient clipping alone).
HANDLER_PHASES = ("clip_select_mask", "after_step")
#: Gradient clipping of the released trainer: DGSTHandler's default (nnU-Net's 12).
CLIP: float = inspect.signature(DGSTHandler).parameters["clip_grad_norm"].default


# --------------------------------------------------------------------------------------------------------------
# The released trainer's mask construction, re-implemented from its description (per-row full argsort, one-hot rows of
# torch.eye; see tests/core/test_released_trainer.py)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def released_masks(sparse: dict[str, nn.Parameter], gamma: int) -> dict[str, torch.Tensor]:
    """One-hot top-gamma masks as the released trainer builds them (float, 1 at kept entries).

    Each gradient is viewed as ``(shape[0], -1)``; every pass ``k < gamma`` fully argsorts ``|grad|`` of each row
    (descending) again and adds the row of ``torch.eye(row_length)`` indexed by the k-th index.
    """
    masks: dict[str, torch.Tensor] = {}
    for name, param in sparse.items():
        if param.grad is None:
            masks[name] = torch.zeros_like(param)
            continue
        rows = param.grad.reshape(param.shape[0], -1)
        eye = torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
        mask = torch.zeros_like(rows)
        for k in range(gamma):
            order = torch.argsort(rows.abs(), dim=1, descending=True)  # re-sorted every pass, as released
            mask += eye[order[:, k]]
        masks[name] = mask.view_as(param)
    return masks


class ReleasedMasking:
    """The released trainer's work after backward, as a handler on the trainer's ``BACKWARD_COMPLETED``:
    clip the gradients' global norm, then multiply the kernels' gradients by :func:`released_masks`.

    It masks the kernels DGST sparsifies (``GradientSelector``'s), so that both modes mask the same tensors.
    """

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma
        self._trainable: list[nn.Parameter] = []
        self._sparse: dict[str, nn.Parameter] = {}
        self._update: SparseUpdate | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._setup)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def _setup(self, engine: SupervisedTrainer) -> None:
        params = dict(engine.network.named_parameters())
        self._trainable = [p for p in params.values() if p.requires_grad]
        self._sparse = GradientSelector(engine.network, gamma=self.gamma).sparse
        self._update = SparseUpdate(params, self._sparse, update="gradient")

    def __call__(self, engine: SupervisedTrainer) -> None:
        torch.nn.utils.clip_grad_norm_(self._trainable, CLIP)
        self._update.before_step(released_masks(self._sparse, self.gamma))


# --------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # full | dgst | released
    update: str | None  # strict | gradient (dgst, released)
    gamma: int


def parse_mode(name: str) -> Mode:
    m = re.fullmatch(r"(full|dgst-strict|dgst-gradient|released)(?:-g(\d+))?", name)
    if m is None:
        raise ValueError(f"unknown mode {name!r}: use full, dgst-strict[-gN], dgst-gradient[-gN] or released[-gN]")
    base, gamma = m.group(1), int(m.group(2) or 1)
    if base == "full":
        return Mode(name, "full", None, 1)
    if base == "released":
        return Mode(name, "released", "gradient", gamma)
    return Mode(name, "dgst", base.split("-")[1], gamma)


def build_plan(args: argparse.Namespace) -> DynUNetPlan:
    """The ``dgst_monai.networks`` plan ``args.plan``, with ``--filters`` / ``--deep-supr-num`` if given."""
    plan = plan_preset(args.plan, **args.plan_overrides)
    changes: dict[str, Any] = {}
    if args.filters:
        if len(args.filters) != plan.n_stages:
            raise ValueError(
                f"--filters needs one value per stage of plan {args.plan!r} ({plan.n_stages}), got {args.filters}"
            )
        changes["filters"] = tuple(args.filters)
    if args.deep_supr_num is not None:
        changes["deep_supr_num"] = args.deep_supr_num
    plan = replace(plan, **changes)
    plan.check_patch(args.patch)
    return plan


def build_network(args: argparse.Namespace) -> nn.Module:
    """The plan's training network (deep supervision on), as the bundle's ``train.json`` builds it."""
    return build_plan(args).network(in_channels=1, out_channels=2, deep_supervision=True)


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic batch: noisy image with a bright ellipsoid, its label the ellipsoid."""
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, 1, *args.patch)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in args.patch], indexing="ij"))
    labels = []
    for _ in range(args.batch):
        centre = (torch.rand(3, generator=g) - 0.5) * 0.6
        radius = 0.2 + 0.3 * torch.rand(3, generator=g)
        inside = (((grid - centre.view(3, 1, 1, 1)) / radius.view(3, 1, 1, 1)) ** 2).sum(0) <= 1
        labels.append(inside)
    label = torch.stack(labels).unsqueeze(1).float()
    image = label * 2.0 + torch.randn(shape, generator=g)
    return image, label


def fine_tuning_parts(args: argparse.Namespace, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The bundle's fine-tuning loss and optimizer (``train.json`` + ``finetune.json``) for ``model``."""
    parser = ConfigParser()
    parser.read_config([str(Path(args.bundle) / "configs" / f"{n}.json") for n in ("train", "finetune")])
    parser["network"] = model  # the optimizer config takes @network.parameters()
    return parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer")


def fixed_batch_trainer(
    args: argparse.Namespace,
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    iterations: int = 1,
    device: torch.device | None = None,
    amp: bool = False,
) -> SupervisedTrainer:
    """The bundle's trainer (loss and optimizer of :func:`fine_tuning_parts`) over one fixed batch, without
    decollation: there is no post-processing to feed, and it would add the same work to every mode."""
    loss, optimizer = fine_tuning_parts(args, model)
    image, label = batch
    return SupervisedTrainer(
        device=device or torch.device("cpu"),
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=[{"image": image, "label": label}] * iterations,
        network=model,
        optimizer=optimizer,
        loss_function=loss,
        decollate=False,
        amp=amp,
    )


def method_handler(mode: Mode) -> DGSTHandler | ReleasedMasking:
    """The handler a mode attaches: the real DGSTHandler, or the released construction."""
    if mode.kind == "released":
        return ReleasedMasking(mode.gamma)
    if mode.kind == "full":
        return DGSTHandler(method="full")
    return DGSTHandler(method="dgst", gamma=mode.gamma, update=mode.update)


class ModeTrainer:
    """One mode: a SupervisedTrainer of its own network copy on the fixed batch, with the mode's handler.

    The trainer is the bundle's (``train#trainer``) without decollation, which has nothing to feed here (no
    post-processing) and would add the same work to every mode. Event handlers registered before and after
    the mode's handler stamp the clock, so each phase of :data:`PHASES` is the time between two events of the
    trainer's own iteration.
    """

    #: Clock stamps of an iteration, in the order the trainer reaches them; a phase ends at its stamp.
    STAMPS = ("start", *PHASES, "end")

    def __init__(
        self,
        args: argparse.Namespace,
        mode: Mode,
        model: nn.Module,
        batch: tuple[torch.Tensor, torch.Tensor],
        iterations: int = 1,
    ) -> None:
        self.mode, self.model = mode, model
        self.trainer = fixed_batch_trainer(args, model, batch, iterations)
        self.stamps: dict[str, float] = {}
        self.times: list[dict[str, float]] = []  # one entry per iteration run so far
        before = {
            "start": Events.ITERATION_STARTED,
            "forward": IterationEvents.FORWARD_COMPLETED,
            "loss": IterationEvents.LOSS_COMPLETED,
            "backward": IterationEvents.BACKWARD_COMPLETED,
            "step": IterationEvents.MODEL_COMPLETED,
        }
        after = {
            "clip_select_mask": IterationEvents.BACKWARD_COMPLETED,
            "after_step": IterationEvents.MODEL_COMPLETED,
            "end": Events.ITERATION_COMPLETED,
        }
        for key, event in before.items():
            self.trainer.add_event_handler(event, self._stamp, key)
        method_handler(mode).attach(self.trainer)  # its callbacks run between the two sets of stamps
        for key, event in after.items():
            self.trainer.add_event_handler(event, self._stamp, key)

    def _stamp(self, engine: Engine, key: str) -> None:
        self.stamps[key] = time.perf_counter()
        if key == "end":
            s = [self.stamps[k] for k in self.STAMPS]
            t = {phase: s[i + 1] - s[i] for i, phase in enumerate(PHASES)}
            t["total"] = s[-1] - s[0]
            t["loss_value"] = engine.state.output["loss"].item()  # after the last stamp: the sync is not timed
            self.times.append(t)

    def run(self) -> dict[str, float]:
        """One ``trainer.run()`` (``iterations`` iterations); the phase times of its last iteration."""
        self.trainer.run()
        return self.times[-1]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_results(result: dict[str, Any], text: str, json_path: str | None, markdown_path: str | None) -> None:
    """Print a benchmark's report, and write its raw result (JSON) and the report (Markdown) where asked."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if markdown_path:
        Path(markdown_path).write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# The three measurements
# --------------------------------------------------------------------------------------------------------------


def bench_time(args: argparse.Namespace, modes: list[Mode]) -> dict:
    torch.manual_seed(args.seed)
    base = build_network(args)
    batch = make_batch(args)
    trainers = [ModeTrainer(args, m, copy.deepcopy(base), batch) for m in modes]
    del base
    raw: dict[str, list[dict[str, float]]] = {m.name: [] for m in modes}
    rounds = args.warmup + args.iterations
    for r in range(rounds):
        for trainer in trainers:  # round-robin: full, dgst-strict, dgst-gradient, ... then again
            t = trainer.run()
            if r >= args.warmup:
                raw[trainer.mode.name].append(t)
            tag = "warm-up" if r < args.warmup else f"{r - args.warmup + 1}/{args.iterations}"
            log(
                f"[time {tag}] {trainer.mode.name:<18} {t['total']:8.3f} s  "
                f"(clip, select, mask {t['clip_select_mask']:.3f} s)"
            )
    summary = {}
    full_raw = raw.get("full")
    full = median([t["total"] for t in full_raw]) if full_raw else float("nan")
    # the handler's work in full mode (gradient clipping alone): what every mode does anyway
    full_handler = sum(median([t[p] for t in full_raw]) for p in HANDLER_PHASES) if full_raw else float("nan")
    for m in modes:
        phases = {p: median([t[p] for t in raw[m.name]]) for p in (*PHASES, "total")}
        added = sum(phases[p] for p in HANDLER_PHASES) - full_handler
        summary[m.name] = {
            "median": phases,
            # ratio of medians
            "ratio_to_full": phases["total"] / full,
            # median over rounds of (this mode / full in the same round): drift within a round cancels
            "paired_ratio": median([a["total"] / b["total"] for a, b in zip(raw[m.name], full_raw)])
            if full_raw
            else float("nan"),
            # 1 + the work the method's handler adds (selection, masking/snapshot, restore) over full's
            # iteration: the forward/backward noise of a loaded machine does not enter it
            "added_s": added,
            "added_ratio": 1 + added / full,
        }
    return {"raw": raw, "summary": summary}


def bench_selection(args: argparse.Namespace) -> dict:
    """Ours vs the released construction on the same real gradients of one backward, per thread count.

    Also times the update side on those gradients (``before_step``, ``optimizer.step()``, ``after_step``) in
    each update mode, which with the selection is all the work DGST adds to an iteration.
    """
    torch.manual_seed(args.seed)
    model = build_network(args).train()
    image, label = make_batch(args)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = fine_tuning_parts(args, model)
    loss(model(image), label).backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    default_threads = torch.get_num_threads()
    out: dict = {}
    for threads in args.selection_threads:
        torch.set_num_threads(threads or default_threads)
        key = f"threads{torch.get_num_threads()}"
        out[key] = {gamma_key: res for gamma_key, res in _selection_at(args, model).items()}
        out[key]["update"] = _update_at(args, model)
    torch.set_num_threads(default_threads)
    return out


def _selection_at(args: argparse.Namespace, model: nn.Module) -> dict:
    out: dict = {}
    threads = torch.get_num_threads()
    for gamma in args.selection_gammas:
        selector = GradientSelector(model, gamma=gamma)
        ours_t, released_t = [], []
        ours = selector()  # warm-up
        for _ in range(args.selection_repeats):
            t0 = time.perf_counter()
            ours = selector()
            ours_t.append(time.perf_counter() - t0)
        for _ in range(args.released_repeats):
            t0 = time.perf_counter()
            released = released_masks(selector.sparse, gamma)
            released_t.append(time.perf_counter() - t0)
            log(f"[select {threads} threads g{gamma}] released {released_t[-1]:.3f} s")
        kept_ours = sum(int(ours[n].sum()) for n in selector.sparse)
        kept_rel = sum(int((released[n] > 0).sum()) for n in selector.sparse)
        same = sum(int((ours[n] & (released[n] > 0)).sum()) for n in selector.sparse)
        total = sum(p.numel() for p in selector.sparse.values())
        widest = max(selector.sparse.values(), key=lambda p: p[0].numel())
        out[f"gamma{gamma}"] = {
            "ours_s": ours_t,
            "released_s": released_t,
            "ours_median_s": median(ours_t),
            "released_median_s": median(released_t),
            "speedup": median(released_t) / median(ours_t),
            "kept_ours": kept_ours,
            "kept_released": kept_rel,
            "kept_by_both": same,
            "sparse_entries": total,
            "sparse_tensors": len(selector.sparse),
            "widest_row": widest[0].numel(),
        }
        del released
        log(
            f"[select {threads} threads g{gamma}] ours {median(ours_t) * 1e3:.1f} ms, released "
            f"{median(released_t):.3f} s, x{median(released_t) / median(ours_t):.0f}; same entries {same}/{kept_ours}"
        )
    return out


def _update_at(args: argparse.Namespace, model: nn.Module) -> dict:
    """Median time of the update side (before_step + step + after_step) per update mode, gamma 1."""
    named = dict(model.named_parameters())
    grads = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in named.items()}
    selector = GradientSelector(model, gamma=1)
    out: dict = {}
    for update in ("none", "strict", "gradient"):
        _, optimizer = fine_tuning_parts(args, model)
        sparse = None if update == "none" else SparseUpdate(named, selector.sparse, update=update)
        before, step, after = [], [], []
        for _ in range(args.selection_repeats + 1):  # the first one allocates momentum buffers and snapshots
            with torch.no_grad():
                for n, g in grads.items():
                    named[n].grad.copy_(g)
            masks = selector()
            t0 = time.perf_counter()
            if sparse is not None:
                sparse.before_step(masks)
            t1 = time.perf_counter()
            optimizer.step()
            t2 = time.perf_counter()
            if sparse is not None:
                sparse.after_step()
            t3 = time.perf_counter()
            before.append(t1 - t0), step.append(t2 - t1), after.append(t3 - t2)
        out[update] = {
            "before_step_s": median(before[1:]),
            "step_s": median(step[1:]),
            "after_step_s": median(after[1:]),
            "total_s": median([a + b + c for a, b, c in zip(before[1:], step[1:], after[1:])]),
        }
        log(f"[update {torch.get_num_threads()} threads] {update:<8} {out[update]}")
    with torch.no_grad():  # leave the model as it was
        for n, p in named.items():
            p.copy_(weights[n])
            if n in grads:
                p.grad.copy_(grads[n])
    return out


def memory_worker(args: argparse.Namespace) -> dict:
    """In a fresh process: peak RSS growth of ``args.memory_worker`` over ``args.memory_iterations`` iterations."""
    mode = parse_mode(args.memory_worker)
    torch.manual_seed(args.seed)
    trainer = ModeTrainer(args, mode, build_network(args), make_batch(args), iterations=args.memory_iterations)
    gc.collect()
    out: dict[str, Any] = {"mode": mode.name, "peak_setup_mib": peak_rss_mb()}  # imports and set-up
    per_iteration: list[float] = []

    def started(engine: Engine) -> None:  # after the handler's set-up, before the first iteration
        gc.collect()
        out["peak_reset"] = reset_peak_rss()
        out["rss_before_mib"], out["peak_before_mib"] = rss_mb(), peak_rss_mb()

    trainer.trainer.add_event_handler(Events.STARTED, started)
    trainer.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: per_iteration.append(peak_rss_mb()))
    trainer.trainer.run()
    out["peak_mib"] = peak_rss_mb()
    out["peak_per_iteration_mib"] = per_iteration
    out["peak_growth_mib"] = out["peak_mib"] - out["rss_before_mib"]
    return out


ALLOCATORS = {
    # glibc as the process finds it: blocks below the (adaptive) mmap threshold are recycled in the heap, so peak
    # RSS also depends on fragmentation
    "default": {},
    # every block >= 64 KiB is its own mmap, returned on free: peak RSS follows the peak of live tensors
    "exact": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def bench_memory(args: argparse.Namespace, modes: list[Mode]) -> dict:
    allocators = list(ALLOCATORS) if args.memory_allocator == "both" else [args.memory_allocator]
    return {a: bench_memory_with(args, modes, a) for a in allocators}


def bench_memory_with(args: argparse.Namespace, modes: list[Mode], allocator: str) -> dict:
    out = {}
    env = {**os.environ, **ALLOCATORS[allocator]}
    forwarded = [
        "--size", args.size, "--plan", args.plan, "--bundle", args.bundle,
        "--filters", *map(str, args.filters), "--patch", *map(str, args.patch), "--batch", str(args.batch),
        "--deep-supr-num", str(args.deep_supr_num), "--seed", str(args.seed),
        "--memory-iterations", str(args.memory_iterations),
    ]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    for m in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", m.name, *forwarded]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {m.name} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out[m.name] = res
        log(
            f"[memory {allocator}] {m.name:<18} peak growth {res['peak_growth_mib']:8.1f} MiB "
            f"(peak RSS {res['peak_mib']:.1f} MiB, {time.perf_counter() - t0:.0f} s)"
        )
    if "full" in out:
        for res in out.values():
            res["growth_ratio_to_full"] = res["peak_growth_mib"] / out["full"]["peak_growth_mib"]
            res["peak_ratio_to_full"] = res["peak_mib"] / out["full"]["peak_mib"]
    return out


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def report(result: dict) -> str:
    lines = []
    cfg = result["config"]
    lines.append(
        f"network: DynUNet plan {cfg['plan']}, filters {cfg['filters']}, patch {cfg['patch']}, batch {cfg['batch']}, "
        f"deep_supr_num {cfg['deep_supr_num']}, {cfg['parameters'] / 1e6:.2f} M parameters; "
        f"torch {cfg['torch']}, {cfg['threads']} threads, {cfg['cpus']} CPUs"
    )
    if "time" in result:
        lines += ["", "| mode | median iteration (s) | ratio to full | paired ratio | clip + select + mask (s) "
                  "| step (s) | after_step (s) | 1 + added / full |", "|---|---|---|---|---|---|---|---|"]
        for name, s in result["time"]["summary"].items():
            md = s["median"]
            lines.append(
                f"| {name} | {md['total']:.3f} | {s['ratio_to_full']:.3f} | {s['paired_ratio']:.3f} | "
                f"{md['clip_select_mask']:.4f} | {md['step']:.4f} | {md['after_step']:.4f} | {s['added_ratio']:.4f} |"
            )
    if "selection" in result:
        lines += ["", "| threads | gamma | ours median (s) | released median (s) | speed-up | same entries |",
                  "|---|---|---|---|---|---|"]
        for threads, per_gamma in result["selection"].items():
            for key, s in per_gamma.items():
                if key.startswith("gamma"):
                    lines.append(
                        f"| {threads[7:]} | {key[5:]} | {s['ours_median_s']:.4f} | {s['released_median_s']:.3f} | "
                        f"{s['speedup']:.0f}x | {s['kept_by_both']}/{s['kept_ours']} |"
                    )
        lines += ["", "| threads | update | before_step (s) | step (s) | after_step (s) | total (s) |",
                  "|---|---|---|---|---|---|"]
        for threads, per_gamma in result["selection"].items():
            for update, s in per_gamma["update"].items():
                lines.append(
                    f"| {threads[7:]} | {update} | {s['before_step_s']:.4f} | {s['step_s']:.4f} | "
                    f"{s['after_step_s']:.4f} | {s['total_s']:.4f} |"
                )
    for allocator, memory in result.get("memory", {}).items():
        lines += ["", f"| mode | peak RSS growth (MiB), {allocator} malloc | ratio to full | peak RSS (MiB) "
                  "| ratio to full |", "|---|---|---|---|---|"]
        for name, s in memory.items():
            lines.append(
                f"| {name} | {s['peak_growth_mib']:.1f} | {s.get('growth_ratio_to_full', float('nan')):.3f} | "
                f"{s['peak_mib']:.1f} | {s.get('peak_ratio_to_full', float('nan')):.3f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="nnunet", help="network size and default counts")
    p.add_argument("--plan", help="dgst_monai.networks plan preset of the network (default: the size's)")
    p.add_argument("--filters", type=int, nargs="+", help="filters, one per stage of the plan (default: the plan's)")
    p.add_argument("--patch", type=int, nargs=3, help="patch size X Y Z, divisible by the plan's total strides")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--deep-supr-num", type=int, help="DynUNet deep-supervision heads (default: the plan's)")
    p.add_argument("--bundle", default=str(BUNDLE), help="bundle whose fine-tuning loss and optimizer are used")
    p.add_argument("--iterations", type=int, help="timed iterations per mode (default: the size's)")
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: the size's)")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, interleaved in this order ({DEFAULT_MODES})")
    p.add_argument("--selection-gammas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--selection-threads", type=int, nargs="+", default=[0, 1],
                   help="thread counts for the selection benchmark (0: torch's default); one thread is immune to\n"
                   "the OpenMP barrier waits that many small kernels suffer on a shared machine")
    p.add_argument("--selection-repeats", type=int, help="repeats of our selection (default 9)")
    p.add_argument("--released-repeats", type=int, help="repeats of the released construction (default 5)")
    p.add_argument("--memory-iterations", type=int, default=2, help="iterations per memory subprocess")
    p.add_argument("--memory-allocator", choices=[*ALLOCATORS, "both"], default="both",
                   help="glibc malloc as is, with a fixed 64 KiB mmap threshold (exact), or both")
    p.add_argument("--memory-modes", help="modes measured for memory (default: --modes)")
    p.add_argument("--skip", nargs="*", default=[], choices=["time", "selection", "memory"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all raw numbers here")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES[args.size]
    # the size's plan overrides apply to its own plan only; explicit --filters still win
    args.plan_overrides = size.get("plan_overrides", {}) if args.plan in (None, size["plan"]) else {}
    args.plan = args.plan or size["plan"]
    args.patch = args.patch or size["patch"]
    args.iterations = args.iterations if args.iterations is not None else size.get("iterations", 5)
    args.warmup = args.warmup if args.warmup is not None else size.get("warmup", 1)
    args.selection_repeats = args.selection_repeats or size.get("selection_repeats", 9)
    args.released_repeats = args.released_repeats or size.get("released_repeats", 5)
    plan = build_plan(args)  # checks --filters and --patch against the plan before any work
    args.filters, args.deep_supr_num = list(plan.filters), plan.deep_supr_num
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return None
    modes = [parse_mode(m) for m in args.modes.split(",") if m]
    memory_modes = [parse_mode(m) for m in (args.memory_modes or args.modes).split(",") if m]
    result: dict = {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "memory_worker"},
            "parameters": sum(p.numel() for p in build_network(args).parameters()),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        },
        "loadavg_start": os.getloadavg(),
    }
    start = time.perf_counter()
    if "time" not in args.skip:
        result["time"] = bench_time(args, modes)
        result["loadavg_after_time"] = os.getloadavg()
    if "selection" not in args.skip:
        result["selection"] = bench_selection(args)
    if "memory" not in args.skip:
        result["memory"] = bench_memory(args, memory_modes)
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - start
    text = report(result)
    print(text)
    print(f"\nwall time {result['wall_s']:.0f} s; load average start {result['loadavg_start']}, "
          f"end {result['loadavg_end']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
