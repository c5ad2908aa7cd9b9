"""Serve the bundles with MONAI Label, and fine-tune them from a clinician's own labels: ``dgst-monai serve``.

MONAI Label (the server 3D Slicer and OHIF talk to) runs a *MONAI Label app*: a folder with a ``main.py`` whose
class subclasses ``MONAILabelApp``. This package lays out such a folder around our bundles and starts the
server on it:

* :mod:`~dgst_monai.serve.layout`: the app folder (``main.py``, ``model/<bundle>/`` with the bundle's configs,
  the foundation weights and every fine-tune beside them) and which weights each model serves;
* :mod:`~dgst_monai.serve.app`: the app class, with one inference task and one fine-tuning task per bundle;
* :mod:`~dgst_monai.serve.tasks`: the tasks themselves, which run the bundle's own ``inference.json`` and
  ``train.json`` + ``finetune.json``;
* :mod:`~dgst_monai.serve.scans`: the checks that turn a bad scan or label into a clear 422;
* :mod:`~dgst_monai.serve.asgi`: the web application uvicorn runs: MONAI Label's, with the inference, training
  and label routes validated first and the inference moved off the event loop;
* :mod:`~dgst_monai.serve.launcher`: lays out the app and starts MONAI Label's server with this Python
  (``python -m dgst_monai.serve.pydicom3 start_server ...``), on the loopback address unless told otherwise;
* :mod:`~dgst_monai.serve.pydicom3`: the one alias MONAI Label 0.8.5 needs under pydicom 3, installed on import of
  this package, so that serving and the clinical DICOM code share one environment.

Install the server with the ``serve`` extra and ``requirements/serve.txt`` (see ``docs/serving.md``).

Example::

    dgst-monai serve --bundle bundles/ln_ct_dynunet --studies ct_studies --checkpoint model.pt --preset cpu-small
"""

from __future__ import annotations

from dgst_monai.serve.pydicom3 import install as _install_pydicom3_alias

_install_pydicom3_alias()

__all__: list[str] = []
