"""MONAI Label 0.8.5 under pydicom 3: the one name it misses, and the server's entry point.

MONAI Label imports pydicom-seg 0.4.1, which does ``from pydicom._storage_sopclass_uids import
SegmentationStorage``; pydicom 3 keeps its storage SOP class UIDs in :mod:`pydicom.uid` and has no
``pydicom._storage_sopclass_uids`` module. That import is all that breaks (MONAI Label's app, DICOM and DICOMweb
datastores, conversions and endpoints import and start under pydicom 3.0.2 with the alias), so
:func:`install` registers :mod:`pydicom.uid` under the old module name, where it is missing, and the clinical
DICOM code (highdicom, which needs pydicom >= 3) shares one environment with the server.

``python -m dgst_monai.serve.pydicom3 start_server ...`` installs the alias and runs ``monailabel.main`` with the
same arguments; ``dgst-monai serve`` starts the server that way.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

import pydicom.uid

__all__ = ["install"]

_OLD_MODULE = "pydicom._storage_sopclass_uids"


def install() -> None:
    """Make ``pydicom._storage_sopclass_uids`` importable (an alias of :mod:`pydicom.uid`) if pydicom lacks it."""
    if _OLD_MODULE not in sys.modules and importlib.util.find_spec(_OLD_MODULE) is None:
        sys.modules[_OLD_MODULE] = pydicom.uid


if __name__ == "__main__":
    install()
    sys.argv[0] = "monailabel.main"
    runpy.run_module("monailabel.main", run_name="__main__", alter_sys=True)
