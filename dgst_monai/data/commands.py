"""``dgst-monai data ...``: synthesise, index, check and split datasets (python-fire command group).

Usage::

    dgst-monai data synth --domain hn --n 20 --output DIR [--preview]
    dgst-monai data index DIR --dataset segrap2023|lnq2023|radcure|nnunet --output datalist.json [--absolute]
    dgst-monai data index DIR dicom --structures 'LN*,*node*' --output DIR/datalist.json
    dgst-monai data to-dicom MASK --series CT_DIR --format rtstruct,dicom-seg --output OUT
    dgst-monai data check datalist.json [--quick]
    dgst-monai data split datalist.json --shots 3,5,10 --seeds 0,1,2 --output splits.json
    dgst-monai data cards                 # list the dataset cards
    dgst-monai data card segrap2023       # print one card
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dgst_monai.normalization import DEFAULT_SAMPLES_PER_CASE

__all__ = ["DataCommands"]


def _err(message: str) -> None:
    print(message, file=sys.stderr)


class DataCommands:
    """Datasets: synthetic CT, indexing a download, validation, deterministic few-shot splits."""

    def synth(
        self,
        output: str,
        domain: str = "hn",
        n: int = 20,
        seed: int = 0,
        n_test: int | None = None,
        preview: bool = False,
        **knobs: Any,
    ) -> str:
        """Write ``n`` synthetic CT cases of ``domain`` (hn | mediastinum) and a MONAI datalist under ``output``.

        Args:
            output: output folder.
            domain: 'hn' (head and neck) or 'mediastinum'.
            n: number of cases (training + test).
            seed: dataset seed.
            n_test: test cases (default 20 % of n).
            preview: also write ``output/preview.png``: axial and coronal slices of the first training case with the
                LN label contoured.
            **knobs: phantom knobs, e.g. ``--fov_mm '[96,96,32]'`` (see ``dgst_monai.data.phantoms``).

        Returns:
            The datalist path (and the preview path when written).
        """
        from dgst_monai.data.phantoms import write_synthetic_dataset

        datalist = Path(write_synthetic_dataset(output, domain=domain, n=n, seed=seed, n_test=n_test, **knobs))
        if not preview:
            return str(datalist)
        from dgst_monai.data.preview import case_montage

        first = json.loads(datalist.read_text(encoding="utf-8"))["training"][0]
        root = datalist.parent
        png = case_montage(root / first["image"], root / first["label"], root / "preview.png")
        return f"{datalist}\n{png}"

    def index(
        self,
        folder: str,
        dataset: str,
        output: str = "datalist.json",
        absolute: bool = False,
        label_dir: str | None = None,
        case_glob: str | None = None,
        image_file: str | None = None,
        label_file: str | None = None,
        image_glob: str | None = None,
        image_suffix: str | None = None,
        label_suffix: str | None = None,
        mask_dir: str | None = None,
        mask_pattern: str | None = None,
        structures: Any = None,
        case_id: str | None = None,
        samples_per_case: int = DEFAULT_SAMPLES_PER_CASE,
        seed: int = 0,
    ) -> str:
        """Build a MONAI datalist (with ``intensity_properties``) from a download in ``folder``.

        Args:
            folder: the dataset folder.
            dataset: segrap2023 | lnq2023 | radcure | nnunet | dicom (layouts: ``dgst-monai data card <name>``;
                ``dicom``: CT series with RTSTRUCT / DICOM-SEG labels anywhere under ``folder``).
            output: datalist to write.
            absolute: absolute paths; default: relative to the datalist's folder.
            label_dir: labels in a separate tree mirroring the image layout.
            case_glob: segrap2023: case folders (default ``segrap_*``).
            image_file: segrap2023: CT file in a case folder (default ``image.nii.gz``; or ``image_contrast.nii.gz``).
            label_file: segrap2023: nodal label file (default ``GTVnd.nii.gz``, unverified: check your download).
            image_glob: lnq2023: image files (default ``**/*-ct.nrrd``).
            image_suffix: lnq2023: image name ending removed to get the case id (default ``-ct.nrrd``).
            label_suffix: lnq2023: segmentation name ending (default ``-seg.nrrd``).
            mask_dir: radcure: folder of the LN masks (default: ``folder``).
            mask_pattern: radcure: mask file name (default ``{case}.nii.gz``).
            structures: dicom (and radcure / lnq2023 DICOM releases): comma-separated, case-insensitive globs on
                RTSTRUCT ROI names and SEG segment labels, e.g. ``'LN*,*node*,GTVn*'``; the union of the matching
                structures is the lymph-node label, written once on the CT grid into ``<output stem>_labels/``.
            case_id: dicom: name cases by ``patient`` (PatientID, default) or ``folder`` (the folder under ``folder``).
            samples_per_case: foreground voxels sampled per case for the intensity statistics.
            seed: sampling seed.

        Returns:
            A summary line.
        """
        from dgst_monai.data.index import COMMON_OPTIONS, DEFAULTS, index_dataset

        given = {
            "label_dir": label_dir, "case_glob": case_glob, "image_file": image_file, "label_file": label_file,
            "image_glob": image_glob, "image_suffix": image_suffix, "label_suffix": label_suffix,
            "mask_dir": mask_dir, "mask_pattern": mask_pattern, "case_id": case_id,
            "structures": None if structures is None else ",".join(structures) if isinstance(structures, (list, tuple)) else str(structures),
        }
        allowed = set(DEFAULTS.get(dataset, {})) | set(COMMON_OPTIONS)
        wrong = sorted(k for k, v in given.items() if v is not None and k not in allowed)
        if wrong:
            raise ValueError(f"--{', --'.join(wrong)} do(es) not apply to --dataset {dataset}")
        options = {k: v for k, v in given.items() if k in allowed}
        path, found = index_dataset(
            folder, dataset, output, absolute=absolute, samples_per_case=samples_per_case, seed=seed, **options
        )
        n_train = sum(c.split == "training" for c in found.cases)
        return (
            f"wrote {path}: {n_train} training and {len(found.cases) - n_train} test cases"
            f"{f', {len(found.skipped)} skipped (see above)' if found.skipped else ''}; "
            f"paths {'absolute' if absolute else 'relative to ' + str(Path(path).resolve().parent)}"
        )

    def to_dicom(
        self,
        mask: str,
        series: str,
        output: str,
        format: Any = "rtstruct,dicom-seg",  # noqa: A002 - the command's --format
        roi_name: str = "Lymph nodes",
        split_nodes: bool = False,
    ) -> str:
        """Write a lymph-node mask (NIfTI / NRRD on the CT series' voxel grid) as DICOM-SEG and / or RTSTRUCT.

        Both reference the source series (study, series, frame of reference, every slice), carry its patient
        and study attributes and get new UIDs; the files are ``<case>_seg.dcm`` and ``<case>_rtstruct.dcm``.

        Args:
            mask: the mask file (voxels > 0 are lymph node), on the series' grid in any axis order.
            series: the CT series folder.
            output: folder to write into.
            format: ``rtstruct``, ``dicom-seg`` or both, comma-separated.
            roi_name: RTSTRUCT ROI name.
            split_nodes: one RTSTRUCT ROI per connected node (``<roi_name> 1``, ``2``, ...).
        """
        from dgst_monai.dicom.writers import mask_to_dicom

        if not isinstance(split_nodes, bool):
            raise ValueError(f"--split_nodes takes no value (or True / False), got {split_nodes!r}")
        formats = ",".join(format) if isinstance(format, (list, tuple)) else str(format)
        result = mask_to_dicom(mask, series, output, formats, roi_name=str(roi_name), split_nodes=split_nodes)
        for note in result.notes:
            _err(f"note: {note}")
        return "\n".join(f"wrote {kind}: {path}" for kind, path in result.files.items())

    def check(
        self,
        datalist: str,
        quick: bool = False,
        air_hu: float = -200.0,
        origin_mm: float = 1e-2,
        spacing_rel: float = 1e-3,
    ) -> str:
        """Validate every case of ``datalist``; print one table of all problems and exit 1 if there is any.

        Never writes anything. Headers are read first, voxels only of files whose header is sound.

        Args:
            datalist: MONAI datalist JSON.
            quick: headers, geometry and file sizes only (no voxel reads: no NaN / HU / label-value checks).
            air_hu: the darkest voxel of a CT must be below this HU value (air or fat present).
            origin_mm: image / label origin tolerance (mm).
            spacing_rel: image / label relative spacing tolerance.
        """
        from dgst_monai.data.validate import Tolerances, check_datalist, format_problems

        tol = Tolerances(air_hu=air_hu, origin_mm=origin_mm, spacing_rel=spacing_rel)
        problems = check_datalist(datalist, tol, voxels=not quick)
        content: dict[str, Any] = {}
        try:
            content = json.loads(Path(datalist).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        n = sum(len(v) for k, v in content.items() if k in ("training", "validation", "test") and isinstance(v, list))
        if problems:
            print(format_problems(problems, base=Path(datalist).resolve().parent))
            raise SystemExit(1)
        return f"{datalist}: {n} cases checked, no problems found"

    def split(
        self,
        datalist: str,
        shots: Any = "3,5,10",
        seeds: Any = "0,1,2",
        output: str = "splits.json",
        test_fraction: float = 0.2,
        split_seed: int = 0,
        intensity: str = "auto",
    ) -> str:
        """Deterministic 8:2 train/test split (if the datalist has no test list) and nested k-shot subsets.

        Args:
            datalist: MONAI datalist JSON.
            shots: k values, e.g. ``3,5,10`` (SegRap2023) or ``5,10,20`` (LNQ2023).
            seeds: few-shot seeds, e.g. ``0,1,2``.
            output: splits JSON to write; it is itself a datalist a bundle can use.
            test_fraction: test share when splitting (0.2 = the paper's 8:2).
            split_seed: seed of the train/test split.
            intensity: auto | train | copy: recompute the intensity statistics over the new training cases
                (auto: only when the test set was made here) or copy them.
        """
        from dgst_monai.data.splits import make_splits, parse_int_list

        result = make_splits(
            datalist,
            shots=parse_int_list(shots, "--shots"),
            seeds=parse_int_list(seeds, "--seeds") or [0],
            output=output,
            test_fraction=test_fraction,
            split_seed=split_seed,
            intensity=intensity,
        )
        lines = [f"wrote {output}: {result['numTraining']} training / {result['numTest']} test cases"]
        for seed, sets in result["few_shot"].items():
            for k, ids in sets.items():
                lines.append(f"  seed {seed} {k:>3}-shot: {', '.join(ids)}")
        return "\n".join(lines)

    def cards(self) -> str:
        """List the dataset cards (data_manifests/*.json)."""
        from dgst_monai.data.manifests import list_manifests, load_manifest

        return "\n".join(f"{name:12s} {load_manifest(name)['title']}" for name in list_manifests())

    def card(self, name: str) -> str:
        """Print one dataset card (source, licence, layout, label derivation, split policy)."""
        from dgst_monai.data.manifests import load_manifest

        return json.dumps(load_manifest(name), indent=2)
