"""The web application ``dgst-monai serve`` runs: MONAI Label's, with its routes' requests checked first.

Started as ``python -m monailabel.main start_server --uvicorn_app dgst_monai.serve.asgi:app``; the inference,
training and label routes are checked before MONAI Label sees them.

MONAI Label 0.8.5 answers every bad request with a 500 (an unknown study id even makes it read the server's
working directory as a DICOM folder), keeps the uploads of failed requests in the temporary folder, and runs
inference on the event loop, so that concurrent requests queue and ``/info/`` stops answering meanwhile. Three
routes are therefore answered here before MONAI Label sees them, through MONAI Label's own request functions:

* ``POST /infer/<model>``: unknown model or study id -> 404; an upload that is not a complete 3-D volume, or
  bad ``params`` -> 422 naming the problem; the upload lives in a temporary folder removed when the request
  ends, whatever happens. The route is a plain function, so FastAPI runs it in its thread pool and the event
  loop stays free (inference itself runs one scan at a time, :mod:`dgst_monai.serve.tasks`).
* ``POST /train/<model>``: unknown model -> 404; parameters checked (:func:`finetune_overrides`) -> 422;
  then MONAI Label starts the fine-tune in its own process.
* ``PUT /datastore/label``: unknown study -> 404; a label that does not fit its image -> 422. For a DICOM study
  (a PACS series) the label may also be a DICOM-SEG (a corrected segmentation from OHIF): its segments are placed
  on the series' grid first.

Every other request goes to MONAI Label unchanged, including the application's start-up and shut-down.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from monailabel.app import app as monailabel_app
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints import infer as infer_endpoints
from monailabel.endpoints import train as train_endpoints
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance

from dgst_monai.serve.app import LymphNodeApp
from dgst_monai.serve.layout import ModelFolder
from dgst_monai.serve.scans import ScanError, check_label, check_scan, check_study, upload_suffix
from dgst_monai.serve.tasks import finetune_overrides

__all__ = ["app", "checked"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: The routes answered by :data:`checked` (method, path below MONAI Label's API prefix).
CHECKED_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("POST", re.compile(r"/infer/[^/]+")),
    ("POST", re.compile(r"/train/[^/]+")),
    ("PUT", re.compile(r"/datastore/label")),
)

checked = FastAPI(title="dgst-monai checked routes", openapi_url=None, docs_url=None, redoc_url=None)
# the same cross-origin policy as MONAI Label's application (OHIF calls from the browser)
checked.add_middleware(
    CORSMiddleware,
    allow_origins=[str(origin) for origin in settings.MONAI_LABEL_CORS_ORIGINS] or ["*"],
    allow_credentials=True,
    allow_methods=["*"],
    allow_headers=["*"],
)


@checked.exception_handler(ScanError)
async def _unusable_scan(request: Request, exc: ScanError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


def _instance() -> LymphNodeApp:
    return app_instance()


def _model(name: str) -> ModelFolder:
    models = _instance().models
    if name not in models:
        raise HTTPException(status_code=404, detail=f"unknown model {name!r}; served models: {', '.join(models)}")
    return models[name]


def _study(image_id: str) -> str:
    uri = _instance().datastore().get_image_uri(image_id)
    if not uri:
        raise HTTPException(status_code=404, detail=f"no study {image_id!r} in the datastore (see GET /datastore/)")
    return uri


def _check_params(text: str) -> None:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise HTTPException(status_code=422, detail=f"params is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"params must be a JSON object, got {text!r}")


def _receive(upload: UploadFile, folder: str, stem: str) -> Path:
    path = Path(folder) / f"{stem}{upload_suffix(upload.filename)}"
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return path


@checked.post(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}")
def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile | None = File(None),
    output: str | None = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """Segment a study (``?image=<id>``) or an uploaded volume (``file``) with ``model``.

    On a PACS the mask of a study is stored back as DICOM-SEG, or as RTSTRUCT with ``output=rtstruct``
    (``output=dicom_seg`` / ``rtstruct`` answer with the JSON result, which names the stored series).
    """
    _model(model)
    _check_params(params)
    stored_as = {"rtstruct": "rtstruct", "dicom_seg": "dicom-seg", "dicom-seg": "dicom-seg"}.get(output or "")
    if output and stored_as is None and output not in {t.value for t in infer_endpoints.ResultType}:
        raise HTTPException(status_code=422, detail=f"output must be image, json, all, dicom_seg or rtstruct, got {output!r}")
    if stored_as is not None:
        params = json.dumps({**json.loads(params or "{}"), "store_format": stored_as})
        output = infer_endpoints.ResultType.json.value
    if file is not None:
        with tempfile.TemporaryDirectory(prefix="upload-") as folder:
            path = _receive(file, folder, "upload")
            check_scan(path, name=file.filename)
            return infer_endpoints.run_inference(background_tasks, model, str(path), "", params, None, None, output)
    if image:
        check_study(_study(image))
        return infer_endpoints.run_inference(background_tasks, model, image, "", params, None, None, output)
    if session_id:
        return infer_endpoints.run_inference(background_tasks, model, "", session_id, params, None, None, output)
    raise HTTPException(status_code=422, detail="nothing to segment: give ?image=<study id> or upload a file")


@checked.post(f"{settings.MONAI_LABEL_API_STR}/train/{{model}}")
def train(
    model: str,
    params: dict[str, Any] | None = None,
    run_sync: bool = False,
    enqueue: bool = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
) -> Any:
    """Fine-tune ``model`` on the labelled studies; the JSON body holds the finetune-config overrides."""
    folder = _model(model)
    try:
        finetune_overrides(folder, params or {}, _instance().labelled_studies())
    except ValueError as err:
        raise HTTPException(status_code=422, detail=str(err)) from None
    return train_endpoints.run_model(model, params, run_sync, enqueue)


@checked.put(f"{settings.MONAI_LABEL_API_STR}/datastore/label")
def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
) -> Any:
    """Store a study's label after checking it against the study (geometry, values 0 / 1, complete file)."""
    uri = _study(image)
    _check_params(params)
    with tempfile.TemporaryDirectory(prefix="label-") as folder:
        head = label.file.read(132)
        label.file.seek(0)
        if Path(uri).is_dir() and head[128:132] == b"DICM":  # a corrected DICOM-SEG of a DICOM study (OHIF)
            label = _segmentation_as_volume(label, uri, Path(folder))
        check_label(uri, _receive(label, folder, "label"), name=label.filename)
        label.file.seek(0)
        return datastore_endpoints.save_label(background_tasks, image, params, tag, label, user.username)


def _segmentation_as_volume(upload: UploadFile, study: str, folder: Path) -> UploadFile:
    """An uploaded DICOM-SEG of a DICOM study as a label volume on the study's grid (all its segments)."""
    from dgst_monai.dicom.labels import segmentation_to_label
    from dgst_monai.dicom.writers import load_series

    seg = folder / "upload.dcm"
    with open(seg, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    volume = folder / "segmentation.nii.gz"
    problems = segmentation_to_label(seg, load_series(study), volume)
    if problems:
        raise ScanError(f"{upload.filename}: {'; '.join(problems)}")
    return UploadFile(file=open(volume, "rb"), filename="segmentation.nii.gz")  # noqa: SIM115 - closed with the request


def _is_checked(scope: Scope) -> bool:
    path = scope["path"][len(settings.MONAI_LABEL_API_STR) :]
    return any(scope.get("method") == method and pattern.fullmatch(path) for method, pattern in CHECKED_ROUTES)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application: the checked routes here, everything else (and the lifespan) MONAI Label's."""
    if scope["type"] == "http" and _is_checked(scope):
        await checked(scope, receive, send)
    else:
        await monailabel_app(scope, receive, send)
