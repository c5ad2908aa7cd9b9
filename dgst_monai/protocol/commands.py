"""``dgst-monai benchmark ...``: the paper's protocol over a grid, and the report of a run (python-fire group).

Usage::

    dgst-monai benchmark --output DIR [--datalist D.json --foundation model.pt] --shots 5,10,20 --seeds 0,1,2
        --methods scratch,full,linear_probe,bias,norm,adapter,lora,dgst [--ablation encoder,decoder,bias_norm,drst,sgst]
        [--gamma 1,2,3,5,10] [--update strict,gradient] [--lr 1e-4,3e-4,1e-3,1e-2] [--eval_at 100,300,1000]
        [--preset cpu-small] [--max_epochs E --iterations_per_epoch I] [--target multisite|mediastinum|site_shift]
        [--source_test D.json|none] [--reference full]
        [--executor local|slurm|submitit-local --slurm '{"slurm_partition": "gpu"}']
    dgst-monai benchmark report DIR        # merge the finished cells of DIR into its report

Every option of ``benchmark`` is keyword-only; lists are comma-separated.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from dgst_monai.protocol.grid import TABLE1_METHODS

__all__ = ["BenchmarkCommands"]


class BenchmarkCommands:
    """The paper's protocol: methods x shots x seeds through the bundle, DSC / NSD / lymph-node metrics, report."""

    def __call__(
        self,
        *,
        output: str,
        datalist: str | None = None,
        foundation: str | None = None,
        source_test: str | None = None,
        shots: Any = "5,10,20",
        seeds: Any = "0",
        methods: Any = ",".join(TABLE1_METHODS),
        ablation: Any = "",
        gamma: Any = "",
        update: Any = "",
        lr: Any = "",
        eval_at: Any = "",
        overrides: dict[str, Any] | None = None,
        preset: str = "cpu-small",
        max_epochs: int | None = None,
        iterations_per_epoch: int | None = None,
        target: str = "multisite",
        synthetic: str = "default",
        cache: str | None = None,
        pretrain_epochs: int | None = None,
        bundle: str = "ln_ct_dynunet",
        executor: str = "local",
        slurm: dict[str, Any] | None = None,
        keep_checkpoints: bool = False,
        threads: int | None = None,
        progress: bool = True,
        reference: str = "full",
    ) -> str:
        """Run every cell of the grid that has no result in ``--output`` yet (a rerun resumes), then write the report.

        Without ``--datalist`` and ``--foundation``: the synthetic default (``--target multisite``, the
        single-scanner ``mediastinum`` (100 target cases split 8:2) or ``site_shift`` (shots from one scanner, test
        cases from many); a foundation model pre-trained on the source phantoms), cached in ``--cache`` (default
        ``DIR/cache``). Each cell fine-tunes with the bundle's ``finetune.json`` (``--preset`` paper | cpu-small |
        tiny, the network; the CPU presets run the cpu_small.json schedule; ``--max_epochs`` /
        ``--iterations_per_epoch`` override it, the same for every method) and scores the final checkpoint (and
        those of ``--eval_at``) with ``evaluate.json`` on the whole test split, and the final one also on the
        held-out source test set (``--source_test``; the synthetic default makes one): the "retained" columns.

        Args:
            output: the run folder.
            datalist: target datalist (MONAI JSON); split 8:2 with seed 0 unless it has a ``test`` list.
            foundation: foundation checkpoint (``normalization.json`` beside it).
            source_test: datalist of held-out source-domain test cases (its ``test`` list) every final checkpoint
                is also scored on; ``none`` for none.
            shots: shot levels.
            seeds: seeds (few-shot draw and training).
            methods: Table 1 methods.
            ablation: Table 2 methods, run beside them.
            gamma: DGST gamma values of the sensitivity sweep.
            update: update modes every sparse method also runs with (``strict``, ``gradient``).
            lr: learning rates every method also runs with, besides the bundle's (e.g. ``1e-4,3e-4,1e-3,1e-2``).
            eval_at: also score the checkpoints after these iterations (budget sweep).
            overrides: further bundle overrides for every cell, e.g. ``'{"precision": "bfloat16"}'``.
            preset: the network preset (``dgst_monai.networks.PRESETS``).
            max_epochs: fine-tuning epochs.
            iterations_per_epoch: iterations per epoch.
            target: synthetic target (without ``--datalist``).
            synthetic: sizes of the synthetic default (``default``; ``tiny`` for tests).
            cache: folder of the synthetic data and foundation.
            pretrain_epochs: epochs of the synthetic default's pre-training (default: the preset's).
            bundle: bundle folder or shipped bundle name.
            executor: ``local`` (one cell after another), ``slurm`` (a submitit job array) or ``submitit-local``.
            slurm: submitit parameters, e.g. ``'{"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 600}'``.
            keep_checkpoints: keep the cells' checkpoints.
            threads: intra-op threads per cell process (default: torch's); the same for every cell of a run.
            progress: show the progress bars.
            reference: the method the report compares every other with, pair by pair (bootstrap interval,
                Wilcoxon p).

        Returns:
            The path of the report.
        """
        from dgst_monai.protocol.runner import BenchmarkSpec, run_benchmark

        spec = BenchmarkSpec(
            datalist=datalist, foundation=foundation, source_test=source_test, shots=shots, seeds=seeds,
            methods=methods, ablation=ablation, gamma=gamma, update=update, lr=lr, eval_at=eval_at,
            bundle_overrides=overrides, preset=str(preset), max_epochs=max_epochs,
            iterations_per_epoch=iterations_per_epoch, target=str(target), synthetic=str(synthetic), cache=cache,
            pretrain_epochs=pretrain_epochs, bundle=str(bundle), executor=str(executor), slurm=slurm,
            keep_checkpoints=keep_checkpoints, threads=threads, progress=progress, command=_command_line(),
            reference=str(reference),
        )
        return str(run_benchmark(str(output), spec))

    def report(self, out_dir: str, reference: str = "full") -> str:
        """Merge the finished cells of the run folder ``out_dir`` into per_case.csv, summary.csv, report.md, PNGs;
        ``--reference`` is the method every other is compared with pair by pair (default ``full``)."""
        from dgst_monai.protocol.report import write_report

        return str(write_report(str(out_dir), reference=str(reference)))


def _command_line() -> str | None:
    """This process's command line as ``dgst-monai ...`` when it is the command (for the report), else None."""
    if Path(sys.argv[0]).name in ("dgst-monai", "cli.py") and "benchmark" in sys.argv[1:]:
        return shlex.join(["dgst-monai", *sys.argv[1:]])
    return None
