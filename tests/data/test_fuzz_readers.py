"""Fuzzing of the data validator and the NIfTI / NRRD loading path with hypothesis: generated headers (dims,
datatypes, spacings, offsets, codes, encodings, including invalid and non-finite values) and arrays, written as
files and then cut short, overwritten in places or extended. Whatever the file, nothing escapes but our own
clear errors: ``read_image`` / ``read_header`` / ``SimpleITKReader`` / ``check_image_file`` raise only
``FileNotFoundError`` or :class:`dgst_monai.files.DamagedFileError` (naming the file), and ``check_datalist``
never raises (it reports). Fixed seed (``derandomize``), a bounded number of examples, no example database."""

from __future__ import annotations

import gzip
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dgst_monai.data.integrity import check_image_file
from dgst_monai.data.readers import SimpleITKReader, read_header, read_image
from dgst_monai.data.validate import check_datalist
from dgst_monai.files import DamagedFileError

FUZZ = settings(
    max_examples=100,
    derandomize=True,  # the same examples on every run and machine
    database=None,  # nothing written into the repository
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OUR_ERRORS = (FileNotFoundError, DamagedFileError)

DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]
#: a plausible value most of the time, else one that breaks something (zero, negative, non-finite, huge)
SPACINGS = st.one_of(st.floats(0.3, 5.0), st.floats(0.3, 5.0), st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e38]))
ANY_FLOAT = st.one_of(st.floats(-500.0, 500.0), st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e38]))
ARRAYS = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6))
)


def mostly(valid: Any, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else a value of ``strategy``."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda keep: st.just(valid) if keep else strategy)


@st.composite
def damage(draw: st.DrawFn) -> dict[str, Any]:
    """What happens to the written bytes: mostly nothing, else a cut, overwritten bytes, or bytes appended."""
    kind = draw(st.sampled_from(["none", "none", "none", "cut", "overwrite", "append"]))
    return {"kind": kind, "at": draw(st.floats(0.02, 1.0)), "bytes": draw(st.binary(min_size=1, max_size=32))}


def _damaged(data: bytes, how: dict[str, Any]) -> bytes:
    at = int(len(data) * how["at"])
    if how["kind"] == "cut":
        return data[:at]
    if how["kind"] == "overwrite":
        return data[:at] + how["bytes"] + data[at + len(how["bytes"]) :]
    if how["kind"] == "append":
        return data + how["bytes"]
    return data


@st.composite
def nifti_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, file bytes): a NIfTI-1 header with generated fields, then the array's bytes, then damage."""
    array = draw(ARRAYS)
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    claimed = draw(mostly(array.shape, hnp.array_shapes(min_dims=1, max_dims=7, min_side=0, max_side=8)))
    header["dim"][0] = len(claimed)
    header["dim"][1 : 1 + len(claimed)] = claimed
    header["pixdim"][1:5] = [draw(SPACINGS) for _ in range(4)]
    header["qform_code"] = draw(st.sampled_from([0, 1, 1, 2, 7]))
    header["sform_code"] = draw(st.sampled_from([0, 1, 1, 2, 7]))
    srows = [[draw(mostly(v, ANY_FLOAT)) for v in row] for row in np.diag([0.8, 0.8, 2.0, 1.0])[:3].tolist()]
    header["srow_x"], header["srow_y"], header["srow_z"] = srows
    header["scl_slope"], header["scl_inter"] = draw(mostly(1.0, ANY_FLOAT)), draw(mostly(0.0, ANY_FLOAT))
    header["datatype"] = draw(mostly(int(header["datatype"]), st.sampled_from([2, 4, 8, 16, 64, 128, 256, 512, 768, 999])))
    header["vox_offset"] = draw(mostly(352, st.sampled_from([0, 348, 1000])))
    raw = header.binaryblock + b"\0" * 4
    raw = raw.ljust(max(int(header["vox_offset"]), len(raw)), b"\0") + array.tobytes(order="F")
    suffix = draw(st.sampled_from([".nii", ".nii.gz"]))
    if suffix == ".nii.gz":
        raw = gzip.compress(raw, compresslevel=1)
    return suffix, _damaged(raw, draw(damage()))


NRRD_TYPE_OF = {"uint8": "unsigned char", "int16": "short", "int32": "int", "float32": "float", "float64": "double"}
NRRD_TYPES = st.sampled_from(["short", "unsigned char", "uint16", "int64", "block", "weird"])
NRRD_DIRECTIONS = st.sampled_from(["(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)", "none", "x", "(1,0) (0,1)"])


@st.composite
def nrrd_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, file bytes): an NRRD header with generated fields, the (maybe gzip-encoded) data, then damage."""
    array = draw(ARRAYS)
    sizes = draw(mostly(list(array.shape), st.lists(st.integers(-1, 8), min_size=1, max_size=4)))
    type_name = draw(mostly(NRRD_TYPE_OF[array.dtype.name], NRRD_TYPES))
    encoding = draw(st.sampled_from(["raw", "gzip", "gzip", "ascii", "bogus"]))
    lines = [
        "NRRD0004",
        f"type: {type_name}",
        f"dimension: {draw(mostly(len(sizes), st.sampled_from([0, 3, 9])))}",
        "sizes: " + " ".join(str(s) for s in sizes),
        f"encoding: {encoding}",
        "endian: little",
    ]
    if len(sizes) == 3 and draw(st.booleans()):
        axes = [" ".join("(" + ",".join(repr(draw(mostly(v, ANY_FLOAT))) for v in row) + ")" for row in np.eye(3).tolist())]
        lines += [
            "space: left-posterior-superior",
            "space directions: " + draw(mostly(axes[0], NRRD_DIRECTIONS)),
            "space origin: (" + ",".join(repr(draw(mostly(0.0, ANY_FLOAT))) for _ in range(3)) + ")",
        ]
    else:
        lines.append("spacings: " + " ".join(repr(draw(SPACINGS)) for _ in sizes))
    data = array.tobytes(order="F")
    if encoding == "gzip":
        data = gzip.compress(data, compresslevel=1)
    elif encoding == "ascii":
        data = " ".join(str(v) for v in array.ravel(order="F")).encode()
    raw = ("\n".join(lines) + "\n\n").encode() + data
    return ".nrrd", _damaged(raw, draw(damage()))


def _exercise(suffix: str, content: bytes) -> dict[str, str]:
    """Every reader on the file: only our errors may come out, naming the file; the validator reports and
    returns. Returns what each reader did (``read`` or ``refused``) and whether the validator found a problem."""
    outcome: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(content)
        reader = SimpleITKReader()
        readers = {
            "check_image_file": check_image_file,
            "read_header": read_header,
            "read_image": read_image,
            "SimpleITKReader": lambda p: reader.get_data(reader.read(p)),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel / numpy warn about odd headers; warnings are not errors here
            for name, read in readers.items():
                try:
                    read(path)
                    outcome[name] = "read"
                except OUR_ERRORS as err:
                    assert str(path) in str(err), err  # named
                    outcome[name] = "refused"
            datalist = Path(folder) / "datalist.json"
            datalist.write_text(f'{{"training": [{{"image": "{path}", "label": "{path}"}}]}}', encoding="utf-8")
            problems = check_datalist(datalist)
            outcome["check_datalist"] = "problems" if problems else "clean"
    return outcome


def _fuzz(files: st.SearchStrategy[tuple[str, bytes]]) -> Counter[tuple[str, str]]:
    """Run :func:`_exercise` on generated files; count the outcomes."""
    outcomes: Counter[tuple[str, str]] = Counter()

    @FUZZ
    @given(files)
    def run(file: tuple[str, bytes]) -> None:
        outcomes.update(_exercise(*file).items())

    run()
    return outcomes


def _assert_both_kinds(outcomes: Counter[tuple[str, str]]) -> None:
    # a fuzzer that only produced unreadable bytes (or only valid files) would test nothing of the reading path
    for reader in ("read_image", "SimpleITKReader"):
        assert outcomes[(reader, "read")] >= 10 and outcomes[(reader, "refused")] >= 10, outcomes
    assert outcomes[("check_datalist", "problems")] >= outcomes[("read_image", "refused")], outcomes


def test_fuzzed_nifti() -> None:
    _assert_both_kinds(_fuzz(nifti_files()))


def test_fuzzed_nrrd() -> None:
    _assert_both_kinds(_fuzz(nrrd_files()))
