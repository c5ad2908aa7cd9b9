"""Checks before long work (dgst_monai.bundle.checks, in the bundle's ``initialize``): a misspelt override, an
unwritable or full output folder, a datalist that fails the data check or has more label classes than the
network each stop the run at once with one message and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bundle_copies import config_list, copy_bundle, make_workflow

from dgst_monai.bundle.checks import (
    bundle_run_arguments,
    check_command_line,
    check_data,
    check_output_folder,
    unknown_overrides,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_bundle(tmp_path_factory.mktemp("bundle"))


def _datalist(tmp_path: Path, tiny_ct: Any, **changes: Any) -> Path:
    """The tiny head-and-neck datalist with absolute paths (and ``changes`` applied), written to ``tmp_path``."""
    content = json.loads(Path(tiny_ct.hn).read_text(encoding="utf-8"))
    base = Path(tiny_ct.hn).parent
    for entries in (content["training"], content.get("test", [])):
        for entry in entries:
            entry["image"], entry["label"] = str(base / entry["image"]), str(base / entry["label"])
    content.update(changes)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_known_keys_pass_and_misspelt_ones_are_named_with_a_suggestion(bundle: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"probe": "$open(@probe_file).read()"}), encoding="utf-8")  # refers to a key only an override gives
    files = config_list(bundle, "train", "finetune") + [str(probe)]
    known = [
        "method", "train#handlers#0#resume", "+train#handlers", "dgst_handler#warmup_steps", "probe_file",
        "train#trainer#max_epochs", "size_prior_handler#weight",
    ]  # fmt: skip
    assert unknown_overrides(files, known) == []
    assert unknown_overrides(files, ["methd", "dgst_handler#gama", "train#trainer#max_epoch", "xyz"]) == [
        "--methd: no such key (did you mean --method?)",
        "--dgst_handler#gama: 'dgst_handler' takes no argument 'gama' (did you mean --dgst_handler#gamma?)",
        "--train#trainer#max_epoch: 'train#trainer' takes no argument 'max_epoch' (did you mean --train#trainer#max_epochs?)",
        "--xyz: no such key",
    ]


def test_the_check_skips_monai_s_own_arguments_and_reads_the_args_file(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = config_list(bundle, "train", "finetune")
    own = {"meta_file": "m.json", "logging_file": "l.conf", "tracking": "mlflow", "tracking_uri": "sqlite:///x"}
    check_command_line({"config_file": files, **own, "method": "bias"})  # nothing wrong
    check_command_line({"config_file": ",".join(files), "shots": 3})  # MONAI's comma-joined config_file
    with pytest.raises(SystemExit) as info:
        check_command_line({"config_file": files, **own, "methd": "bias", "shots": 3})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--methd: no such key (did you mean --method?)" in err and "--shots" not in err and "tracking" not in err

    args_file = tmp_path / "args.json"  # MONAI takes the config files and further overrides from it
    args_file.write_text(json.dumps({"config_file": files, "methd": "bias", "shots": 3}), encoding="utf-8")
    with pytest.raises(SystemExit):
        check_command_line({"args_file": str(args_file), "dgst_handler#gama": 2})
    err = capsys.readouterr().err
    assert "--methd: no such key" in err and "--dgst_handler#gama" in err and "--shots" not in err


def test_only_the_monai_bundle_command_is_checked(
    bundle: Path, tiny_ct: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command is recognised by what runs (``monai.bundle.__main__`` as ``__main__``, ``monai.bundle.run`` on
    the call stack), not by the program's command line: a workflow made by other code passes whatever
    ``sys.argv`` says; under the command, the overrides ``run`` was given are checked."""
    files = config_list(bundle, "train", "finetune")
    monai_argv = [
        "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py", "run", "--config_file", repr(files),
        "--methd", "bias",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", monai_argv)
    assert bundle_run_arguments() is None
    check_command_line()  # pytest runs this, not monai.bundle: nothing to check, whatever sys.argv says

    from monai.bundle import run

    # what runpy sets for python -m monai.bundle; outside run() there is still no command to read
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", importlib.util.find_spec("monai.bundle.__main__"))
    assert bundle_run_arguments() is None
    ckpt = tmp_path / "tuned"
    with pytest.raises(SystemExit) as info:
        run(
            config_file=files, meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
            datalist=tiny_ct.mediastinum, ckpt_dir=str(ckpt), preset="tiny", methd="bias",
        )  # fmt: skip
    assert info.value.code == 2
    assert "--methd: no such key (did you mean --method?)" in capsys.readouterr().err
    assert not ckpt.exists()


def test_a_misspelt_override_stops_the_command_before_any_work(bundle: Path, tiny_ct: Any, tmp_path: Path) -> None:
    """``python -m monai.bundle run ... --methd bias``: exit 2 with the suggestion; nothing written, nothing trained."""
    ckpt = tmp_path / "tuned"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(config_list(bundle, "train", "finetune")),
        "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
        "--datalist", tiny_ct.mediastinum, "--ckpt_dir", str(ckpt), "--preset", "tiny", "--shots", "2",
        "--methd", "bias",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: the command line overrides keys the bundle does not have" in done.stderr
    assert "--methd: no such key (did you mean --method?)" in done.stderr
    assert "Traceback" not in done.stderr  # one message, not a stack
    assert not ckpt.exists()


def test_output_folder_must_be_writable_and_have_room(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_output_folder(tmp_path / "new" / "models") == str(tmp_path / "new" / "models")
    assert [p.name for p in (tmp_path / "new" / "models").iterdir()] == []  # the write probe is gone
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(SystemExit):
        check_output_folder(blocker / "models")
    assert f"cannot write to the output folder {blocker / 'models'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_output_folder(tmp_path, min_free_gb=1e9)
    assert "GB free in" in capsys.readouterr().err


def test_training_data_must_pass_the_data_check_and_fit_the_classes(
    tiny_ct: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _datalist(tmp_path, tiny_ct)
    assert check_data(good, out_channels=2) == str(good)

    labels = {"0": "background", "1": "lymph_node", "2": "vessel"}
    three = _datalist(tmp_path, tiny_ct, labels=labels)
    with pytest.raises(SystemExit):
        check_data(three, out_channels=2)
    assert "has 3 label classes ['0', '1', '2'] but the network has out_channels=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_data(_datalist(tmp_path, tiny_ct), out_channels=2, in_channels=2)
    assert "the network has in_channels=2" in capsys.readouterr().err

    broken = _datalist(tmp_path, tiny_ct)
    content = json.loads(broken.read_text(encoding="utf-8"))
    image = tmp_path / "cut.nii.gz"
    image.write_bytes(Path(content["training"][0]["image"]).read_bytes()[:2000])
    content["training"][0]["image"] = str(image)
    broken.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(SystemExit):
        check_data(broken, out_channels=2)
    err = capsys.readouterr().err
    assert "has problems" in err and "cut.nii.gz" in err and "truncated" in err


def test_the_bundle_checks_before_training(tiny_ct: Any, tmp_path: Path, bundle: Path) -> None:
    """Through the bundle's initialize: a damaged training file stops the run before the first expression of
    ``run`` (which writes normalization.json)."""
    broken = _datalist(tmp_path, tiny_ct)
    content = json.loads(broken.read_text(encoding="utf-8"))
    (tmp_path / "cut.nii.gz").write_bytes(Path(content["training"][1]["image"]).read_bytes()[:2000])
    content["training"][1]["image"] = str(tmp_path / "cut.nii.gz")
    broken.write_text(json.dumps(content), encoding="utf-8")
    workflow = make_workflow(bundle, ["train"], datalist=str(broken), ckpt_dir=str(tmp_path / "models"))
    with pytest.raises(SystemExit) as info:
        workflow.initialize()
    assert info.value.code == 2
    assert not (tmp_path / "models" / "normalization.json").exists()
