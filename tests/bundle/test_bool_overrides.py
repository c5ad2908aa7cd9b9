"""Boolean overrides mean what they say: ``--resume false``, ``--mirror no``, ``--amp 0``, ``--size_prior False``
typed on a ``python -m monai.bundle run`` command line turn those off (fire hands the bundle the strings
``"false"`` / ``"no"``, which Python finds true), through ``dgst_monai.bundle.config_values.flag``, once per setting (the configs' ``settings``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bundle_copies import config_list, copy_bundle
from monai.bundle import ConfigParser

from dgst_monai.bundle.config_values import flag
from dgst_monai.handlers import TrainingStateCheckpoint

#: What the test reads back from the parsed bundle, instead of running it: the objects the booleans configure.
PROBE: dict[str, Any] = {
    "+imports": ["$import json"],
    "probe": {
        "resume": "$[h.resume for h in @train#handlers if type(h).__name__ == 'TrainingStateCheckpoint'][0]",
        "loads_foundation": "$any(type(h).__name__ == 'SafeCheckpointLoader' for h in @train#handlers)",
        "trainer_amp": "$@train#trainer.amp",
        "evaluator_amp": "$@validate#evaluator.amp",
        "mirror": "$@inferer.inferer.enabled",
        "size_prior": "$@size_prior_handler.enabled",
    },
    "run": ["$open(@probe_file, 'w').write(json.dumps(@probe))"],
}


@pytest.mark.parametrize("word", ["false", "False", "FALSE", "0", 0, "no", "No", "off", " n ", False])
def test_false_words(word: Any) -> None:
    assert flag(word, "resume") is False


@pytest.mark.parametrize("word", ["true", "True", "1", 1, "yes", "on", "y", True])
def test_true_words(word: Any) -> None:
    assert flag(word, "resume") is True


@pytest.mark.parametrize("word", ["maybe", "", 2, -1, None, 0.5, ["false"], "flase"])
def test_anything_else_is_refused_with_the_key_and_the_spellings(word: Any) -> None:
    with pytest.raises(ValueError, match=r"amp must be true or false, got .*--amp false"):
        flag(word, "amp")


def test_training_state_handler_reads_a_typed_false(tmp_path: Path) -> None:
    """Even a config that passes ``@resume`` unconverted does not resume on ``--resume false``."""
    assert TrainingStateCheckpoint(tmp_path, {}, resume="false").resume is False
    assert TrainingStateCheckpoint(tmp_path, {}, resume="yes").resume is True
    with pytest.raises(ValueError, match="resume must be true or false"):
        TrainingStateCheckpoint(tmp_path, {}, resume="ture")


def _finetune_configs(tmp_path: Path) -> tuple[Path, list[str]]:
    root = copy_bundle(tmp_path)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE), encoding="utf-8")
    return root, config_list(root, "train", "finetune") + [str(probe)]


def test_command_line_false_words_turn_resume_mirror_amp_and_size_prior_off(tiny_ct, tmp_path: Path) -> None:
    """One real ``python -m monai.bundle run`` of the fine-tuning configs with four spellings of false; the
    probe (instead of the training) writes what the parsed handlers, trainer and inferer got."""
    root, configs = _finetune_configs(tmp_path)
    out = tmp_path / "probe_out.json"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs),
        "--meta_file", str(root / "configs" / "metadata.json"), "--bundle_root", str(root),
        "--datalist", str(tiny_ct.mediastinum), "--ckpt_dir", str(tmp_path / "tuned"), "--preset", "tiny",
        "--num_workers", "0", "--shots", "2", "--normalization", "shots", "--foundation_checkpoint", str(tmp_path / "foundation.pt"),
        "--probe_file", str(out),
        # as a user types them: fire passes "false" and "no" on as strings, 0 as an int, False as a bool
        "--resume", "false", "--mirror", "no", "--amp", "0", "--size_prior", "False",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "resume": False,
        "loads_foundation": True,  # not resuming: the foundation weights are loaded
        "trainer_amp": False,
        "evaluator_amp": False,
        "mirror": False,
        "size_prior": False,
    }


@pytest.mark.parametrize(("resume", "mirror", "amp"), [("yes", "true", "1"), ("on", "True", "y")])
def test_true_words_turn_them_on(tiny_ct, tmp_path: Path, resume: str, mirror: str, amp: str) -> None:
    """The same configs parsed with the strings a command line would pass for other spellings of true."""
    _, configs = _finetune_configs(tmp_path)
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(
        {"datalist": str(tiny_ct.mediastinum), "preset": "tiny", "num_workers": 0, "shots": 2, "normalization": "shots", "ckpt_dir": str(tmp_path / "t"),
         "resume": resume, "mirror": mirror, "amp": amp, "size_prior": "no"}
    )  # fmt: skip
    assert parser.get_parsed_content("probe") == {
        "resume": True,
        "loads_foundation": False,  # resuming: the state holds the weights, the foundation must not overwrite them
        "trainer_amp": True,
        "evaluator_amp": True,
        "mirror": True,
        "size_prior": False,
    }


def test_inference_mirror_and_amp_false(tmp_path: Path) -> None:
    """inference.json: ``--mirror false --amp false`` reach the inferer and the evaluator as False."""
    root = copy_bundle(tmp_path)
    parser = ConfigParser()
    parser.read_config(config_list(root, "inference"))
    parser.update({"preset": "tiny", "mirror": "false", "amp": "false"})
    assert parser.get_parsed_content("inferer").inferer.enabled is False
    assert parser.get_parsed_content("evaluator").amp is False
