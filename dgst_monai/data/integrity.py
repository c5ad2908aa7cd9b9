"""Is an image file complete? Truncated or corrupt voxel data that the readers themselves do not notice.

ITK (and so SimpleITK, MONAI's ``ITKReader`` and MONAI Label) reads a NIfTI file cut short without complaint
and fills the missing voxels with zeros; nibabel, ITK's NRRD and MetaImage readers decode a gzip / zlib stream
with damaged bytes in the middle without checking its checksum. :func:`check_image_file` reads what the header
promises and refuses a file whose voxel block is shorter or longer than its header describes, or whose
compressed stream is cut off or fails its checksum:

- NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``): ``vox_offset`` + dims x datatype size, gzip stream and CRC;
- NRRD (``.nrrd``, ``.nhdr`` with a single detached data file): sizes x type size for raw, gzip and bzip2
  encodings (the text encodings are checked by the reader itself);
- MetaImage (``.mha``, ``.mhd`` with a single data file): DimSize x channels x element size, raw or zlib.

Other files (a DICOM slice, unknown formats) are left to the readers. Everything streams: a large
``.nii.gz`` costs one decompression pass and constant memory. :func:`check_nifti_header` checks a NIfTI header
alone (dims in range, finite spacing and sform / qform): ITK hangs on some headers with infinite entries, so the
readers call it before ITK sees a NIfTI file.

Example:
    >>> from dgst_monai.data.integrity import check_image_file
    >>> check_image_file("case_0001.nii.gz")  # doctest: +SKIP
    Traceback (most recent call last):
    dgst_monai.files.DamagedFileError: case_0001.nii.gz: truncated file: its gzip stream ends early (...)
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from dgst_monai.data.cases import NIFTI_SUFFIXES
from dgst_monai.files import DamagedFileError

__all__ = ["check_image_file", "check_nifti_header", "read_nifti_header"]

_CHUNK = 1 << 22
_NRRD_HEADER_LIMIT = 1 << 20  # a header is a few hundred bytes: a file without a blank line is not NRRD
_META_HEADER_LIMIT = 1 << 16


def read_nifti_header(path: str | os.PathLike[str]) -> Any:
    """The NIfTI-1 / NIfTI-2 header exactly as stored (``nib.load`` would fix it, e.g. a zero pixdim into 1).

    Raises:
        DamagedFileError: not a readable NIfTI header.
    """
    import nibabel as nib

    p = Path(path)
    opener: Callable[..., IO[bytes]] = gzip.open if p.name.lower().endswith(".gz") else open  # type: ignore[assignment]
    try:
        with opener(p, "rb") as fh:
            header = nib.Nifti1Header.from_fileobj(fh, check=False)
            if int(header["sizeof_hdr"]) != 348:
                fh.seek(0)
                header = nib.Nifti2Header.from_fileobj(fh, check=False)
    except Exception as err:  # noqa: BLE001 - nibabel, gzip and numpy raise many kinds for a bad header
        raise DamagedFileError(f"{p}: unreadable NIfTI header ({_reason(err)})") from None
    return header


def check_nifti_header(path: str | os.PathLike[str]) -> Any:
    """The NIfTI header of ``path`` if its geometry is usable: dims in range, finite spacing, and finite sform /
    qform values where their codes say they are used. Reads the header only.

    ITK's NIfTI reader hangs on some headers with an infinite sform entry (found by tests/data/test_fuzz_readers.py):
    every reader here checks the header with this first, so ITK never sees one.

    Returns:
        The header (as :func:`read_nifti_header`).

    Raises:
        DamagedFileError: an unreadable header or one of the values above out of range.

    Example::

        header = check_nifti_header("ct.nii.gz")
        header.get_data_shape()  # (512, 512, 120)
    """
    header = read_nifti_header(path)
    dim = [int(d) for d in header["dim"]]
    problems = []
    if not 1 <= dim[0] <= 7:
        problems.append(f"dim[0] = {dim[0]} (the number of dimensions must be 1 to 7)")
    elif any(d < 0 for d in dim[1 : 1 + dim[0]]):
        problems.append(f"negative dims {dim[1 : 1 + dim[0]]}")
    else:
        fields = [("pixdim", header["pixdim"][1 : 1 + min(dim[0], 3)])]
        if int(header["sform_code"]) > 0:
            fields += [(f"srow_{axis}", header[f"srow_{axis}"]) for axis in "xyz"]
        if int(header["qform_code"]) > 0:
            fields += [(k, header[k]) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")]
        problems += [f"{name} = {np.asarray(value).tolist()}" for name, value in fields if not np.all(np.isfinite(value))]
    if problems:
        raise DamagedFileError(f"{path}: damaged NIfTI header: {', '.join(problems)} (not finite or out of range)")
    return header


def check_image_file(path: str | os.PathLike[str]) -> None:
    """Raise if the voxel data of an image file are cut short, longer than the header says, or corrupt.

    Args:
        path: a NIfTI, NRRD or MetaImage file; other files pass unchecked.

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: the file is damaged; the message names it and says how.

    Example::

        check_image_file("lnq2023-train-0001-ct.nrrd")
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        _check_nifti(p)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(p)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(p)


# ---------------------------------------------------------------------------------------------- helpers


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text or type(err).__name__)[:200]


def _compare(path: Path | str, found: int, expected: int, described: str) -> None:
    if found < expected:
        raise DamagedFileError(
            f"{path}: truncated file: its voxel data end after {found:,} of the {expected:,} bytes its header "
            f"describes ({described}); the file was cut off (an interrupted copy or upload?)"
        )
    if found > expected:
        raise DamagedFileError(
            f"{path}: voxel data do not match the header: the file holds {found:,} bytes of them, the header "
            f"describes {expected:,} ({described})"
        )


def _where(header: Path, data: Path) -> str:
    """How to name a file in a message: a detached header with its data file."""
    return str(header) if data == header else f"{header} (its data file {data.name})"


def _stream_length(chunks: Iterator[bytes]) -> int:
    return sum(len(c) for c in chunks)


def _gzip_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=fh, mode="rb") as z:  # checks every member's CRC and length at its end
        while chunk := z.read(_CHUNK):
            yield chunk


def _decompressed_length(path: Path | str, fh: IO[bytes], decompressor: Any, kind: str) -> int:
    """Bytes a zlib / bzip2 stream decodes to; the stream must end (its checksum verified) before the file does."""
    total = 0
    try:
        while chunk := fh.read(_CHUNK):
            total += len(decompressor.decompress(chunk))
            if decompressor.eof:
                break
    except (OSError, ValueError, zlib.error) as err:
        raise DamagedFileError(f"{path}: corrupt {kind} stream in its voxel data ({_reason(err)})") from None
    if not decompressor.eof:
        raise DamagedFileError(f"{path}: truncated file: its {kind} stream of voxel data ends early (after {total:,} bytes)")
    return total


def _gzip_length(path: Path | str, fh: IO[bytes]) -> int:
    try:
        return _stream_length(_gzip_chunks(fh))
    except EOFError:
        raise DamagedFileError(f"{path}: truncated file: its gzip stream ends early (an interrupted copy or upload?)") from None
    except (OSError, zlib.error) as err:
        raise DamagedFileError(f"{path}: corrupt gzip stream ({_reason(err)})") from None


# ---------------------------------------------------------------------------------------------- NIfTI


def _check_nifti(path: Path) -> None:
    header = check_nifti_header(path)
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as err:  # noqa: BLE001 - a damaged header fails in many ways
        raise DamagedFileError(f"{path}: damaged NIfTI header ({_reason(err)})") from None
    expected = math.prod(shape) * itemsize
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as fh:
            found = _gzip_length(path, fh) - offset
    else:
        found = path.stat().st_size - offset
    _compare(path, max(found, 0), expected, f"dims {list(shape)} of {itemsize}-byte voxels after {offset} header bytes")


# ---------------------------------------------------------------------------------------------- NRRD

_NRRD_INT_SIZES = ((("int8", "char"), 1), (("int16", "short"), 2), (("int64", "longlong", "long long"), 8), (("int",), 4))


def _nrrd_type_size(type_name: str) -> int | None:
    t = " ".join(type_name.lower().replace("_t", "").split())
    if t == "float":
        return 4
    if t == "double":
        return 8
    for words, size in _NRRD_INT_SIZES:
        if any(w in t for w in words):
            return size
    return None  # "block" and unknown types: not checked here


def _read_nrrd_header(path: Path, fh: IO[bytes]) -> tuple[dict[str, str], int]:
    """The fields of an NRRD header and the offset of the attached data (after the blank line)."""
    magic = fh.readline(64)
    if not magic.startswith(b"NRRD"):
        raise DamagedFileError(f"{path}: not an NRRD file (no NRRD magic at its start)")
    fields: dict[str, str] = {}
    while True:
        line = fh.readline(_NRRD_HEADER_LIMIT)
        if not line or line in (b"\n", b"\r\n"):
            break
        if fh.tell() > _NRRD_HEADER_LIMIT:
            raise DamagedFileError(f"{path}: damaged NRRD header (no end of header in its first MB)")
        text = line.decode("latin-1").rstrip("\r\n")
        if text.startswith("#") or ":=" in text or ":" not in text:
            continue  # comments and key/value pairs
        key, value = text.split(":", 1)
        fields[key.strip().lower().replace(" ", "")] = value.strip()
    return fields, fh.tell()


def _check_nrrd(path: Path) -> None:
    with open(path, "rb") as fh:
        fields, data_start = _read_nrrd_header(path, fh)
    size = _nrrd_type_size(fields.get("type", ""))
    encoding = fields.get("encoding", "").lower()
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        byte_skip = int(fields.get("byteskip", "0"))
        line_skip = int(fields.get("lineskip", "0"))
    except ValueError:
        raise DamagedFileError(f"{path}: damaged NRRD header (sizes {fields.get('sizes')!r})") from None
    if size is None or not sizes or line_skip or encoding not in ("raw", "gzip", "gz", "bzip2", "bz2"):
        return  # text encodings, line skips and block types: the reader's own checks
    data_file = fields.get("datafile", "")
    if data_file:
        if data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
            return  # several data files: the reader's own checks
        data, data_start = path.parent / data_file, 0
        if not data.is_file():
            raise DamagedFileError(f"{path}: its data file {data} does not exist")
    else:
        data = path
    where = _where(path, data)
    expected = math.prod(sizes) * size
    described = f"sizes {sizes} of {size}-byte {fields.get('type')} values, {encoding} encoding"
    with open(data, "rb") as fh:
        if encoding == "raw":
            available = data.stat().st_size - data_start
            if byte_skip == -1:  # the data are the file's last bytes: only a short file is wrong
                _compare(where, min(available, expected), expected, described)
                return
            _compare(where, max(available - byte_skip, 0), expected, described)
            return
        fh.seek(data_start)
        if encoding in ("gzip", "gz"):
            found = _gzip_length(where, fh)
        else:
            found = _decompressed_length(where, fh, bz2.BZ2Decompressor(), "bzip2")
    _compare(where, max(found - max(byte_skip, 0), 0), expected, described)


# ---------------------------------------------------------------------------------------------- MetaImage

_MET_SIZES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG_LONG": 8,
              "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}  # fmt: skip
_META_LINE = re.compile(rb"^\s*(\w+)\s*=\s*(.*?)\s*$")


def _check_metaimage(path: Path) -> None:
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        while True:
            line = fh.readline(_META_HEADER_LIMIT)
            if not line or fh.tell() > _META_HEADER_LIMIT:
                raise DamagedFileError(f"{path}: damaged MetaImage header (no ElementDataFile line)")
            match = _META_LINE.match(line)
            if match is None:
                raise DamagedFileError(f"{path}: damaged MetaImage header (line {line[:60]!r})")
            key, value = match[1].decode("latin-1"), match[2].decode("latin-1")
            fields[key] = value
            if key == "ElementDataFile":
                data_start = fh.tell()
                break
    size = _MET_SIZES.get(fields.get("ElementType", "").removeprefix("MET_"))
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except ValueError:
        raise DamagedFileError(f"{path}: damaged MetaImage header (DimSize {fields.get('DimSize')!r})") from None
    data_file = fields["ElementDataFile"]
    if size is None or not dims or (data_file != "LOCAL" and len(data_file.split()) > 1) or data_file.startswith("LIST"):
        return  # unknown element types and multi-file data: the reader's own checks
    data = path if data_file == "LOCAL" else path.parent / data_file
    if data is not path:
        if not data.is_file():
            raise DamagedFileError(f"{path}: its data file {data} does not exist")
        data_start = max(header_size, 0)
    where = _where(path, data)
    expected = math.prod(dims) * channels * size
    described = f"DimSize {dims} x {channels} channel(s) of {fields.get('ElementType')}"
    if fields.get("CompressedData", "False").lower() == "true":
        with open(data, "rb") as fh:
            fh.seek(data_start)
            # zlib or gzip header, detected (wbits 32 + 15); the adler32 / CRC is verified at the stream's end
            found = _decompressed_length(where, fh, zlib.decompressobj(32 + zlib.MAX_WBITS), "zlib")
    else:
        available = data.stat().st_size - data_start
        found = min(available, expected) if header_size == -1 else available
    _compare(where, max(found, 0), expected, described)
