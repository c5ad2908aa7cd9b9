"""The ``dgst-monai`` command (python-fire).

``demo``, ``predict``, ``methods``, ``import-nnunet``, ``delta export|apply``, ``data synth|index|check|split``. Each command is a thin call
into the library; heavy imports happen inside the command so ``dgst-monai --help`` stays fast.
"""

from __future__ import annotations

import json
from typing import Any

import fire

from dgst_monai.data.commands import DataCommands


class Data(DataCommands):
    """Datasets: synthetic CT phantoms, indexing a download, validation, few-shot splits, dataset cards."""


class Delta:
    """Sparse weight deltas: store only the entries a fine-tune changed."""

    def export(self, base: str, tuned: str, o: str) -> str:
        """Write the entries of ``tuned`` that differ from ``base`` (indices + exact values) to ``o``."""
        from dgst_monai.delta import save_delta

        return _report(save_delta(base, tuned, o).as_dict())

    def apply(self, base: str, delta: str, o: str) -> str:
        """Rebuild the fine-tuned weights, bit-identical, from ``base`` and ``delta`` into ``o``."""
        from dgst_monai.delta import load_and_apply

        return _report(load_and_apply(base, delta, o).as_dict())


def _report(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2)


class Commands:
    """Few-shot fine-tuning of a CT lymph-node segmentation foundation model with DGST (MONAI bundles)."""

    def __init__(self) -> None:
        self.data = Data()
        self.delta = Delta()

    def demo(self, out: str | None = None, preset: str = "default", shots: int = 5, seed: int = 0) -> None:
        """Synthesise CT, pre-train a small foundation model, fine-tune it (full vs DGST) on ``shots`` target
        cases, evaluate both on held-out target cases and print DSC / NSD. About 10 minutes on a 2-core CPU."""
        from dgst_monai.demo import run_demo

        run_demo(out=out, preset=preset, shots=shots, seed=seed)

    def methods(self, network: str | None = None, steps: int | None = None, gamma: int = 1) -> str:
        """List the fine-tuning methods (``--method`` of the finetune config).

        With ``--network NAME`` (dynunet, dynunet_resenc, swinunetr, swinunetr_v2, or a planner preset such as
        ``paper`` / ``cpu-small``), a table of trainable parameters per method on that network, and with
        ``--steps N`` the most entries each method can change in N optimizer steps.
        """
        from dgst_monai.methods import METHODS

        if network is None:
            return "\n".join(f"{m.name:14s} {m.label}" for m in METHODS.values())
        from dgst_monai.accounting import account_methods, format_table

        return format_table(account_methods(_network(network), gamma=gamma, steps=steps))

    def predict(
        self,
        bundle: str,
        input: str | list[str],  # noqa: A002 - the command's --input
        output: str,
        checkpoint: str | None = None,
        mirror: bool = False,
        preset: str | None = None,
    ) -> str:
        """Segment lymph nodes in CT scans (NIfTI / NRRD files, DICOM series folders) with a bundle's inference
        config; writes ``<case>_lymph_nodes.nii.gz`` masks with each input's exact geometry into ``output``."""
        from dgst_monai.predict import predict

        return "\n".join(predict(bundle, input, output, checkpoint=checkpoint, mirror=mirror, preset=preset))

    def import_nnunet(self, model_folder: str, o: str = "model.pt", fold: int | str = 0) -> str:
        """Convert an nnU-Net v2 model folder (plans.json, fold_*/checkpoint_final.pth) into an
        ``ln_ct_dynunet`` checkpoint ``o`` plus the network override JSON written next to it."""
        from dgst_monai.networks.nnunet_import import export_nnunet

        return str(export_nnunet(model_folder, o, fold=fold))


def _network(name: str) -> Any:
    from dgst_monai.networks.factory import NETWORKS, build_network
    from dgst_monai.networks.planner import plan_preset

    if name in NETWORKS:
        return build_network(name)
    try:
        return plan_preset(name).network()
    except (KeyError, ValueError):
        raise ValueError(f"unknown network {name!r}: use one of {', '.join(NETWORKS)} or a planner preset") from None


def main() -> None:
    fire.Fire(Commands, name="dgst-monai")


if __name__ == "__main__":
    main()
