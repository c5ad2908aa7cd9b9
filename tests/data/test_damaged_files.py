"""Damaged images are an error naming the file at every entry point, never a zero-filled volume.

Bad inputs: a ``.nii.gz`` of 3.5 MB cut to its first 100 KB (the issue's upload), a ``.nii.gz`` with damaged
bytes inside its gzip stream (its CRC fails; nibabel and ITK decode it without checking), NIfTI headers whose
dims promise more or fewer voxels than stored, a ``.nii`` cut short, an empty and a random-bytes ``.nii.gz``,
NRRD cut short (gzip and raw) and with a corrupt gzip stream, a MetaImage with a corrupt zlib stream, DICOM
series with a truncated slice file and with a missing slice. Entry points: ``read_image`` (inference, serving,
``data index``), the bundles' ``LoadImaged`` with the SimpleITK reader (inference and
training), ``dgst-monai data check`` and the server's upload check.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from bundle_copies import SEED, config_list, copy_bundle, make_workflow
from data_helpers import ct_volume, to_sitk, write, write_datalist, write_dicom_series
from monai.bundle import ConfigParser

from dgst_monai.cli import main as cli_main
from dgst_monai.data.readers import read_image
from dgst_monai.data.validate import check_datalist
from dgst_monai.files import DamagedFileError
from dgst_monai.serve.scans import ScanError, check_scan

SHAPE = (32, 32, 16)


def _ct_like_nifti(path: Path, shape: tuple[int, int, int] = (256, 256, 54)) -> Path:
    """A CT-like NIfTI (air around a noisy body) of about 3.5 MB gzipped, as a real upload would be."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    hu = np.where(body[..., None], 40.0, -1000.0) + rng.normal(0, 12, shape)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    return path


def _nifti_with_shape(path: Path, stored: tuple[int, ...], claimed: tuple[int, ...]) -> Path:
    """A .nii.gz whose header claims ``claimed`` dims while ``stored`` voxels follow it."""
    hu, _ = ct_volume(stored)  # type: ignore[arg-type]
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(claimed)
    header.set_sform(np.diag([0.8, 0.9, 2.5, 1.0]), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + np.asfortranarray(hu).tobytes(order="F"))
    return path


def _cut(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _corrupt(path: Path, at: float = 0.5, n: int = 64) -> Path:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + n] = bytes(n)
    path.write_bytes(bytes(data))
    return path


def _volume(path: Path, compressed: bool = True) -> Path:
    """A small CT volume; NRRD / MetaImage gzip / zlib-compressed unless ``compressed`` is False."""
    sitk.WriteImage(to_sitk(ct_volume(SHAPE)[0]), str(path), useCompression=compressed)
    return path


def _random_bytes(tmp: Path) -> Path:
    path = tmp / "ct.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _truncated_upload(tmp: Path) -> Path:
    path = _ct_like_nifti(tmp / "upload.nii.gz")
    assert 3.3e6 < path.stat().st_size < 3.8e6
    return _cut(path, 100_000)


def _dicom_truncated_slice(tmp: Path) -> Path:
    folder = write_dicom_series(tmp / "series", ct_volume(SHAPE)[0])
    _cut(folder / "slice_005.dcm", (folder / "slice_005.dcm").stat().st_size // 2)
    return folder


def _dicom_missing_slice(tmp: Path) -> Path:
    return write_dicom_series(tmp / "series", ct_volume(SHAPE)[0], skip=(5,))


def _nhdr_short_data(tmp: Path) -> Path:
    header = _volume(tmp / "ct.nhdr", compressed=False)  # SimpleITK writes the raw data file beside it
    data = next(p for p in tmp.iterdir() if p.name.startswith("ct.") and p.suffix != ".nhdr")
    _cut(data, data.stat().st_size - 100)
    return header


#: name -> (builder of the bad input in a folder, words the error must contain: a regular expression)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nii.gz cut to 100 KB of 3.5 MB": (_truncated_upload, "truncated file"),
    "nii.gz with a corrupt gzip stream": (lambda t: _corrupt(_ct_like_nifti(t / "ct.nii.gz")), "corrupt gzip stream"),
    "nii.gz header dims beyond the data": (
        lambda t: _nifti_with_shape(t / "ct.nii.gz", SHAPE, (32, 32, 32)), "truncated file"),
    "nii.gz header dims short of the data": (
        lambda t: _nifti_with_shape(t / "ct.nii.gz", SHAPE, (32, 32, 8)), "do not match the header"),
    "nii cut short": (lambda t: _cut(_volume(t / "ct.nii"), 20_000), "truncated file"),
    "empty nii.gz": (lambda t: _cut(_volume(t / "ct.nii.gz"), 0), "unreadable NIfTI header"),
    "random bytes as nii.gz": (_random_bytes, "unreadable NIfTI header"),
    "nrrd (gzip) cut short": (lambda t: _cut(_volume(t / "ct.nrrd"), 2000), "truncated file"),
    "nrrd (gzip) corrupt": (lambda t: _corrupt(_volume(t / "ct.nrrd")), "corrupt gzip stream"),
    "nrrd (raw) cut short": (lambda t: _cut(_volume(t / "raw.nrrd", compressed=False), 20_000), "truncated file"),
    "nhdr with a short data file": (_nhdr_short_data, "truncated file"),
    "mha (zlib) corrupt": (lambda t: _corrupt(_volume(t / "ct.mha"), at=0.6), "corrupt zlib stream"),
    "DICOM series with a truncated slice": (_dicom_truncated_slice, "slice_005.dcm cannot be parsed"),
    # data check words it as it always has ("irregular slice spacing ... (missing slices?)")
    "DICOM series with a missing slice": (_dicom_missing_slice, "missing or duplicate slices|missing slices"),
}  # fmt: skip


@pytest.fixture(params=list(BAD_INPUTS), ids=list(BAD_INPUTS))
def bad_input(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    build, words = BAD_INPUTS[request.param]
    return build(tmp_path), words


def _chain(err: BaseException) -> str:
    """The messages of an exception and of its causes (MONAI wraps transform errors)."""
    texts = []
    while err is not None:
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


@pytest.fixture(scope="module")
def inference_preprocessing(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The inference bundle's own preprocessing (LoadImaged with the SimpleITK reader) ..."""
    root = copy_bundle(tmp_path_factory.mktemp("bundle"))
    parser = ConfigParser()
    parser.read_config(config_list(root, "inference"))
    parser.update({"preset": "tiny", "checkpoint": str(root / "models" / "model.pt")})
    return parser.get_parsed_content("preprocessing#transforms#0")  # ... its LoadImaged: reading is the point


def test_read_image_refuses(bad_input: tuple[Path, str]) -> None:
    path, words = bad_input
    with pytest.raises(DamagedFileError, match=words) as info:
        read_image(path)
    assert str(path) in str(info.value)  # for a detached header: the header, and its data file


def test_the_bundles_loadimaged_refuses(bad_input: tuple[Path, str], inference_preprocessing: Any) -> None:
    """Through MONAI's LoadImaged and its fallback readers: the damage surfaces, with the file, and no reader
    silently reads the file instead."""
    path, words = bad_input
    with pytest.raises(Exception) as info:
        inference_preprocessing({"image": str(path)})
    text = _chain(info.value)
    assert re.search(words, text) and str(path) in text


def test_data_check_reports_and_does_not_raise(bad_input: tuple[Path, str], tmp_path: Path) -> None:
    path, words = bad_input
    label = write(tmp_path / "label.nii.gz", ct_volume(SHAPE)[1])
    datalist = write_datalist(tmp_path / "datalist.json", [{"case_id": "c0", "image": str(path), "label": str(label)}])
    problems = check_datalist(datalist)
    assert any(p.file == str(path) and re.search(words, p.problem) for p in problems), problems


@pytest.mark.parametrize("case", [name for name in BAD_INPUTS if not name.startswith("DICOM")])
def test_the_server_refuses_an_upload(case: str, tmp_path: Path) -> None:
    """``dgst_monai.serve.scans.check_scan``, what the server runs on an upload (HTTP 422); single files only,
    as uploads are."""
    build, words = BAD_INPUTS[case]
    path = build(tmp_path)
    with pytest.raises(ScanError) as info:
        check_scan(path, name=path.name)
    assert path.name in str(info.value) and re.search(words, str(info.value))


def test_the_truncated_upload_is_refused_by_data_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``dgst-monai data check`` exits 1 with a table row naming the file and saying it is truncated."""
    image = _truncated_upload(tmp_path)
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 54), np.uint8), np.diag([0.8, 0.8, 2.5, 1.0])), label)
    datalist = write_datalist(tmp_path / "datalist.json", [{"case_id": "c0", "image": str(image), "label": str(label)}])
    with pytest.raises(SystemExit) as info:
        cli_main(["data", "check", "--datalist", str(datalist)])
    assert info.value.code == 1
    out = capsys.readouterr().out
    assert "upload.nii.gz" in out and "truncated file" in out


def test_training_refuses_the_truncated_upload(tmp_path: Path, tiny_ct: Any) -> None:
    """The bundle's training (SimpleITK reader) stops while caching, naming the file."""
    import json

    content = json.loads(Path(tiny_ct.hn).read_text(encoding="utf-8"))
    base = Path(tiny_ct.hn).parent
    bad = _truncated_upload(tmp_path)
    content["training"][0]["image"] = str(bad)
    for entry in content["training"][1:] + content.get("test", []):
        entry["image"], entry["label"] = str(base / entry["image"]), str(base / entry["label"])
    content["training"][0]["label"] = str(base / content["training"][0]["label"])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content), encoding="utf-8")
    root = copy_bundle(tmp_path)
    workflow = make_workflow(
        root, ["train"], datalist=str(datalist), ckpt_dir=str(tmp_path / "models"), num_validation=0, val_interval=0,
        initialize=[SEED],  # the reader's own refusal: without the bundle's data check in front of it
    )  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.run()
    text = _chain(info.value)
    assert str(bad) in text and "truncated file" in text
    assert not (tmp_path / "models" / "model.pt").exists()
