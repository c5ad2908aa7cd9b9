"""The ``dgst-monai`` command (python-fire): ``demo``, ``methods``, ``data synth``."""

from __future__ import annotations

from typing import Any

import fire


class Data:
    """Datasets: synthetic CT phantoms."""

    def synth(self, out: str, domain: str = "hn", n: int = 20, seed: int = 0, **knobs: Any) -> str:
        """Write ``n`` synthetic CT cases of ``domain`` (hn | mediastinum) and a MONAI datalist under ``out``."""
        from dgst_monai.data.phantoms import write_synthetic_dataset

        return str(write_synthetic_dataset(out, domain=domain, n=n, seed=seed, **knobs))


class Commands:
    """Few-shot fine-tuning of a CT lymph-node segmentation foundation model with DGST (MONAI bundles)."""

    def __init__(self) -> None:
        self.data = Data()

    def demo(self, out: str | None = None, preset: str = "default", shots: int = 5, seed: int = 0) -> None:
        """Synthesise CT, pre-train a small foundation model, fine-tune it (full vs DGST) on ``shots`` target
        cases, evaluate both on held-out target cases and print DSC / NSD. About 10 minutes on a 2-core CPU."""
        from dgst_monai.demo import run_demo

        run_demo(out=out, preset=preset, shots=shots, seed=seed)

    def methods(self) -> str:
        """List the fine-tuning methods (``--method`` of the finetune config)."""
        from dgst_monai.methods import METHODS

        return "\n".join(f"{m.name:14s} {m.label}" for m in METHODS.values())


def main() -> None:
    fire.Fire(Commands, name="dgst-monai")


if __name__ == "__main__":
    main()
