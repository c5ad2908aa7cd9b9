"""Resume after SIGKILL at any moment: pre-training, a DGST and an SGST fine-tune of the bundle are killed at
exact points, resumed with ``--resume true`` (each resumed run may itself be killed again later) and finish with
weights, optimizer, scheduler, selector and random states bit-identical to an uninterrupted run.

Every run is ``python -m monai.bundle run ...`` with the bundle's shipped configs, in a process of its own:
forked from a forkserver that did the imports once (``fault_injection.run_bundle_main`` runs ``monai.bundle``'s
``__main__`` with the command line), so a run
costs its training, not 5-20 s of imports. The kills come from inside (tests/fault_injection.py), so they hit
the same point on every run; the process dies by SIGKILL (exit code -9), with no clean-up of its own.

Kill points (runs of 2 epochs; iterations counted per process, so in a resumed run from epoch 2 on):
pre-training (2 x 2 iterations): after ``backward()`` of iteration 3 (mid-iteration, before the optimizer
step), during epoch 2's validation, while writing the epoch-2 training state, while writing the final
``model.pt``; DGST (2 x 3 iterations of batch 1 over 2 shots, so an epoch ends inside a pass over the data unless
the sampler draws one pass per epoch): after iteration 4 (mid-epoch), while writing the epoch-2 training state;
SGST (2 x 2): after ``backward()`` of iteration 4, while writing ``model.pt``.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
from pathlib import Path
from typing import Any

import fault_injection
import pytest
import torch
from bundle_copies import config_list, copy_bundle

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # trainings killed and resumed several times: minutes

# the forkserver imports these once; every run is a fresh fork of that process
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["fault_injection", "monai.bundle", "dgst_monai.handlers", "dgst_monai.networks"])

KILLED = -signal.SIGKILL
RUN = {
    "preset": "tiny",
    "iterations_per_epoch": 2,
    "max_epochs": 2,
    "num_workers": 0,
    "amp": False,
}
PRETRAIN = {**RUN, "num_validation": 1, "val_interval": 1}
FINETUNE = {**RUN, "shots": 2, "val_interval": 0}


class Bundle:
    """The bundle copy, the synthetic data and a runner of ``python -m monai.bundle run`` in a forked process."""

    def __init__(self, tmp: Path, datalist: str) -> None:
        self.tmp = tmp
        self.root = copy_bundle(tmp / "bundle")
        self.datalist = datalist
        self.runs = 0

    def run(self, names: list[str], ckpt_dir: Path, kill: dict[str, Any] | None = None, **overrides: Any) -> int:
        """Run the configs ``names`` (each with its pending overlay, then ``kill`` as one more config file);
        return the exit code (``-9`` when killed)."""
        self.runs += 1
        configs = config_list(self.root, *names)
        if kill is not None:
            extra = self.tmp / f"kill_{self.runs}.json"
            extra.write_text(json.dumps(kill), encoding="utf-8")
            configs.append(str(extra))
        argv = ["run", "--config_file", repr(configs)]
        options = {
            "meta_file": str(self.root / "configs" / "metadata.json"),
            "logging_file": str(self.root / "configs" / "logging.conf"),
            "bundle_root": str(self.root),
            "datalist": self.datalist,
            "ckpt_dir": str(ckpt_dir),
            "output_dir": str(ckpt_dir / "eval"),
            **overrides,
        }
        for key, value in options.items():
            argv += [f"--{key}", value if isinstance(value, str) else repr(value)]
        log = self.tmp / f"run_{self.runs}.log"
        process = _CONTEXT.Process(target=fault_injection.run_bundle_main, args=(argv, str(log)))
        process.start()
        process.join(timeout=600)
        if process.exitcode not in (0, KILLED):
            tail = log.read_text(encoding="utf-8")[-4000:]
            pytest.fail(f"run {self.runs} ({names}) failed with exit code {process.exitcode}:\n{tail}")
        return process.exitcode


def kill_at(event: str, at: int, where: str = "train#handlers") -> dict[str, Any]:
    return {f"+{where}": [{"_target_": "fault_injection.KillAt", "event": event, "at": at}]}


def kill_while_saving(name: str) -> dict[str, Any]:
    return {"+train#handlers": [{"_target_": "fault_injection.KillDuringSave", "name": name}]}


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and bit-identical tensors (dtype, shape and every byte)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(run: Path, reference: Path) -> None:
    """The final model and the whole final training state (but ignite's list of saved files) are identical."""
    assert_identical(_load(run / "model.pt"), _load(reference / "model.pt"), "model.pt")
    state, expected = _load(run / "training_state_epoch=2.pt"), _load(reference / "training_state_epoch=2.pt")
    state.pop("checkpointer"), expected.pop("checkpointer")
    assert_identical(state, expected, "training state")


def states(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("training_state", ".training_state")))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_ct: Any) -> Bundle:
    """The bundle copy on the tiny head-and-neck data (2 training cases), with an uninterrupted pre-training (the
    reference, and the foundation model of the fine-tunes)."""
    bundle = Bundle(tmp_path_factory.mktemp("resume_kill"), tiny_ct.hn)
    assert bundle.run(["train"], bundle.tmp / "pretrain_ref", **PRETRAIN) == 0
    return bundle


def test_pretraining_killed_four_times_resumes_to_identical_weights(bundle: Bundle) -> None:
    """Mid-iteration, during validation, while saving the training state, while saving model.pt."""
    run = bundle.tmp / "pretrain_killed"
    names = ["train"]

    assert bundle.run(names, run, kill_at("BACKWARD_COMPLETED", 3), **PRETRAIN) == KILLED
    assert states(run) == ["training_state_epoch=1.pt"]
    epoch1 = _load(run / "training_state_epoch=1.pt")

    assert bundle.run(names, run, kill_at("ITERATION_COMPLETED", 1, "validate#handlers"), resume=True, **PRETRAIN) == KILLED
    assert states(run) == ["training_state_epoch=1.pt"] and not (run / "model.pt").exists()

    assert bundle.run(names, run, kill_while_saving("training_state_epoch=2"), resume=True, **PRETRAIN) == KILLED
    # the half-written state is a temporary file; the previous state is still there, whole
    leftovers = [n for n in states(run) if n.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".training_state_epoch=2.pt.")
    assert_identical(_load(run / "training_state_epoch=1.pt"), epoch1, "epoch-1 state")

    previous = {"kept": torch.arange(3.0)}  # a model.pt from before: it must survive a kill while replacing it
    torch.save(previous, run / "model.pt")
    before = (run / "model.pt").read_bytes()
    assert bundle.run(names, run, kill_while_saving("model.pt"), resume=True, **PRETRAIN) == KILLED
    assert (run / "model.pt").read_bytes() == before
    # the resumed run removed the leftover temporary file, wrote epoch 2, then removed epoch 1
    assert states(run) == ["training_state_epoch=2.pt"]
    assert len(list(run.glob(".model.pt.*.tmp"))) == 1

    assert bundle.run(names, run, resume=True, **PRETRAIN) == 0
    assert states(run) == ["training_state_epoch=2.pt"] and not list(run.glob(".model.pt.*.tmp"))
    assert_same_training(run, bundle.tmp / "pretrain_ref")


@pytest.mark.parametrize(
    ("method", "first_kill", "second_kill", "extra"),
    [
        # batch 1 and 3 iterations over 2 shots: an epoch ends inside a pass unless the sampler draws per epoch
        ("dgst", kill_at("ITERATION_COMPLETED", 4), kill_while_saving("training_state_epoch=2"),
         {"batch_size": 1, "iterations_per_epoch": 3}),
        ("sgst", kill_at("BACKWARD_COMPLETED", 4), kill_while_saving("model.pt"), {"dgst_handler#warmup_steps": 2}),
    ],
)  # fmt: skip
def test_finetune_killed_twice_resumes_to_identical_weights(
    bundle: Bundle, method: str, first_kill: dict[str, Any], second_kill: dict[str, Any], extra: dict[str, Any]
) -> None:
    """A fine-tune from the foundation model: killed, resumed and killed again, resumed to the end; its weights,
    optimizer momentum, scheduler, selector (SGST's static mask) and random states equal an uninterrupted run."""
    names = ["train", "finetune"]
    options = {
        **FINETUNE,
        **extra,
        "method": method,
        "foundation_checkpoint": str(bundle.tmp / "pretrain_ref" / "model.pt"),
    }
    reference, run = bundle.tmp / f"{method}_ref", bundle.tmp / f"{method}_killed"
    assert bundle.run(names, reference, **options) == 0

    assert bundle.run(names, run, first_kill, **options) == KILLED
    assert states(run) == ["training_state_epoch=1.pt"]
    assert bundle.run(names, run, second_kill, resume=True, **options) == KILLED
    assert "training_state_epoch=1.pt" in states(run) or "training_state_epoch=2.pt" in states(run)
    assert bundle.run(names, run, resume=True, **options) == 0
    assert_same_training(run, reference)
    dgst = _load(run / "training_state_epoch=2.pt")["dgst"]
    assert dgst["steps"] == 2 * options["iterations_per_epoch"] and dgst["settings"]["method"] == method
