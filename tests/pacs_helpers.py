"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian's ``orthanc`` and ``orthanc-dicomweb``), on a
free loopback port with a throw-away storage folder, started and stopped by the test module."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from helpers import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Pacs:
    url: str
    folder: Path
    process: subprocess.Popen

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, path: Path) -> dict:
        """``POST /instances`` one file; Orthanc's answer (its ids and status)."""
        response = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=60)
        response.raise_for_status()
        return response.json()

    def upload_folder(self, folder: Path) -> int:
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        for path in files:
            self.upload(path)
        return len(files)

    def series(self, modality: str | None = None) -> list[dict]:
        """QIDO-RS series (optionally of one modality) as DICOM JSON."""
        params = {"includefield": "all"} | ({"Modality": modality} if modality else {})
        response = requests.get(f"{self.dicomweb}/series", params=params, timeout=60)
        response.raise_for_status()
        return response.json() if response.content else []

    def instance_count(self) -> int:
        return len(requests.get(f"{self.url}/instances", timeout=60).json())


@contextmanager
def orthanc(folder: Path) -> Iterator[Pacs]:
    """An Orthanc on a free loopback port storing into ``folder``; stopped (and its files kept) on exit."""
    exe = shutil.which("Orthanc")
    assert exe is not None and DICOMWEB_PLUGIN.is_file(), "Orthanc with DICOMweb is not installed; .ci/run installs it"
    folder.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    config = {
        "Name": "dgst-monai-test",
        "HttpPort": http,
        "DicomPort": dicom,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")  # noqa: SIM115 - open for the process's lifetime
    process = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, (folder / "orthanc.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Orthanc did not answer QIDO within 60 s"
            time.sleep(0.2)
        yield Pacs(url, folder, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
