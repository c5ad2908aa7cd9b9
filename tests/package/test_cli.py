"""The ``dgst-monai`` command line as users type it: several scans, spelled-out options, and refusals before any
work when fire would bind a value to a parameter the user did not name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bundle_support import BUNDLES

import dgst_monai.demo
import dgst_monai.predict
from dgst_monai.bundle.resources import bundle_dir, find_bundle
from dgst_monai.cli import CommandLineError, Commands, check_command_line, main, merge_repeated_options
from dgst_monai.predict import mask_path


@pytest.fixture
def predict_calls(monkeypatch) -> list[dict]:
    """The arguments of every ``dgst_monai.predict.predict`` call the command makes (the real function runs)."""
    calls: list[dict] = []
    real = dgst_monai.predict.predict

    def spy(bundle, input, output, **kwargs):  # noqa: A002
        calls.append(dict(bundle=bundle, input=input, output=output, **kwargs))
        return real(bundle, input, output, **kwargs)

    monkeypatch.setattr(dgst_monai.predict, "predict", spy)
    return calls


def _scans(tiny_ct) -> list[str]:
    root = Path(tiny_ct.mediastinum).parent
    return [str(root / "imagesTr" / "mediastinum_0000.nii.gz"), str(root / "imagesTs" / "mediastinum_0002.nii.gz")]


@pytest.mark.parametrize("form", ["after --input", "unnamed"])
def test_predict_segments_every_scan_and_leaves_mirror_off(
    form, tiny_ct, tiny_checkpoint, tmp_path, predict_calls
):
    """``--input a b`` and ``a b`` both segment both scans; no scan lands in ``mirror`` or another option."""
    scans, out = _scans(tiny_ct), tmp_path / "masks"
    given = ["--input", *scans] if form == "after --input" else scans
    options = ["--bundle", str(BUNDLES / "ln_ct_dynunet"), "--checkpoint", str(tiny_checkpoint), "--preset", "tiny"]
    main(["predict", *given, *options, "--output", str(out)])

    (call,) = predict_calls
    assert call["input"] == scans and call["mirror"] is False and call["preset"] == "tiny"
    assert sorted(p.name for p in out.iterdir()) == sorted(mask_path(s, out).name for s in scans)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "--input", "a.nii.gz", "--mirror", "b.nii.gz"], "--mirror is a switch: write --mirror alone"),
        (["predict", "--input", "a.nii.gz", "--mirror=false"], "--mirror=True / --mirror=False \\(got 'false'\\)"),
        (["predict", "--input", "a.nii.gz", "--input", "b.nii.gz"], "--input given twice"),
        (["predict", "--input", "a.nii.gz", "--checkpoint"], "--checkpoint needs a value"),
        (["predict", "-i", "a.nii.gz"], "unknown option -i; write it out: --input"),
        (["demo", "tiny"], "demo: unexpected argument 'tiny'; options: --output, --size, --shots, --seed"),
        (["demo", "--sizee", "tiny"], "unknown option --sizee"),
        (["demo", "--out", "runs/x"], "unknown option --out; options: --output"),
        (["delta", "export", "--base", "a.pt", "--tuned", "b.pt", "--o", "d.pt"], "write it out: --output"),
        (["data", "split", "datalist.json", "3,5"], "'3,5' would be taken as --shots; name it: --shots 3,5"),
        (["data", "index", "DIR", "--dataset", "lnq2023", "dl.json"], "'dl.json' would be taken as --output"),
        (["import-nnunet", "folder", "model.pt"], "unexpected argument 'model.pt'; options: --model_folder, --output"),
        (["methods", "dynunet"], "unexpected argument 'dynunet'"),
        (["benchmark", "--output", "runs/b", "--shot", "5"], "benchmark: unknown option --shot"),
        (["benchmark", "runs/b"], "benchmark: unexpected argument 'runs/b'"),
    ],
)
def test_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch, predict_calls):
    """Each line exits with status 2 and names the fix; neither the demo nor a prediction starts."""

    def no_demo(**kwargs):
        raise AssertionError("the demo started")

    monkeypatch.setattr(dgst_monai.demo, "run_demo", no_demo)
    monkeypatch.chdir(tmp_path)
    bundle = ["--bundle", str(BUNDLES / "ln_ct_dynunet"), "--output", "masks"] if argv[0] == "predict" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *bundle])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("dgst-monai ")
    with pytest.raises(CommandLineError, match=message):
        check_command_line(Commands(), [*argv, *bundle])
    assert predict_calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "a.nii.gz", "b.nii.gz", "--bundle", "ln_ct_dynunet", "--output", "masks", "--mirror"],
        ["predict", "--input", "a.nii.gz", "--mirror=True", "--bundle=ln_ct_dynunet", "--output", "m"],
        ["predict", "--input", "[a.nii.gz,b.nii.gz]", "--nomirror", "--bundle", "b", "--output", "m"],
        ["data", "index", "DIR", "--dataset", "segrap2023", "--output", "dl.json", "--absolute"],
        ["data", "check", "datalist.json", "--quick"],
        ["data", "synth", "--output", "phantoms", "--fov_mm", "[96,96,32]", "--seed", "-1"],
        ["delta", "apply", "--base", "a.pt", "--delta", "d.pt", "--output", "b.pt"],
        ["import-nnunet", "nnunet_folder", "--output", "model.pt", "--fold", "all"],
        ["demo", "--size", "tiny", "--output", "runs/tiny"],
        ["demo", "--help"],
        ["benchmark", "--output", "runs/b", "--shots", "5,10", "--methods", "full,dgst", "--threads", "1"],
        ["benchmark", "report", "runs/b"],
        ["benchmark", "report", "runs/b", "--reference", "dgst"],
        ["benchmark", "--output", "runs/b", "--methods", "full,dgst,bias_norm_head", "--reference", "bias_norm_head"],
    ],
)
def test_command_lines_as_documented_pass_the_check(argv):
    """What the README and the commands' help show is accepted as is."""
    check_command_line(Commands(), argv)


def test_bundle_option_takes_a_folder_or_a_shipped_name(tmp_path):
    """``--bundle bundles/ln_ct_dynunet`` in a checkout, ``--bundle ln_ct_dynunet`` anywhere."""
    assert find_bundle("ln_ct_dynunet") == bundle_dir("ln_ct_dynunet")
    assert find_bundle(bundle_dir("ln_ct_dynunet")) == bundle_dir("ln_ct_dynunet").resolve()
    with pytest.raises(FileNotFoundError, match="no shipped bundle 'ln_ct_unet'.*shipped: ln_ct_dynunet"):
        find_bundle("ln_ct_unet")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_bundle(tmp_path / "missing")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "split", "{tmp}/missing.json", "--shots", "3"], "dgst-monai data split: error: datalist {tmp}/missing.json does not exist"),
        (["import-nnunet", "{tmp}/no_model", "--output", "{tmp}/m.pt"], "dgst-monai import-nnunet: error: {tmp}/no_model: not a directory"),
        (["delta", "apply", "--base", "{tmp}/a.pt", "--delta", "{tmp}/d.pt", "--output", "{tmp}/b.pt"], "dgst-monai delta apply: error: checkpoint {tmp}/a.pt does not exist"),
    ],
)
def test_an_input_error_is_one_line_and_status_2(argv, message, tmp_path, capsys, monkeypatch):
    """A missing input stops the command with its message, not a traceback; DGST_MONAI_DEBUG=1 shows the error."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message.format(tmp=tmp_path)) and len(err.splitlines()) == 1
    monkeypatch.setenv("DGST_MONAI_DEBUG", "1")
    with pytest.raises((FileNotFoundError, ValueError)):
        main(argv)
    assert list(tmp_path.iterdir()) == []


def test_repeated_serve_options_become_one_list_and_other_repeats_are_refused():
    """``serve --bundle a --bundle b`` is one list (fire would keep only ``b``); a repeat elsewhere stays refused."""
    merged = merge_repeated_options(
        ["serve", "--bundle", "a", "--studies", "s", "--bundle=b", "--checkpoint", "x.pt", "--checkpoint", "y.pt"]
    )
    assert merged == ["serve", "--studies", "s", "--bundle=[a, b]", "--checkpoint=[x.pt, y.pt]"]
    check_command_line(Commands(), merged)
    assert merge_repeated_options(["serve", "--bundle", "a", "b"]) == ["serve", "--bundle", "a", "b"]
    with pytest.raises(CommandLineError, match="serve: --bundle needs a value"):
        merge_repeated_options(["serve", "--bundle", "a", "--bundle", "--port", "1"])
    with pytest.raises(CommandLineError, match=r"demo: --size given twice; give it once$"):
        check_command_line(Commands(), merge_repeated_options(["demo", "--size", "a", "--size", "b"]))


def test_help_lists_the_options_as_they_must_be_written(capsys):
    """``predict --help`` shows ``--output OUTPUT`` and no one-letter alias that the check would refuse."""
    main(["predict", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: dgst-monai predict [SCANS ...] --bundle BUNDLE --output OUTPUT [--input INPUT]")
    assert "[--mirror]" in text and "Segment lymph nodes" in text
    assert not re.search(r"(^|\s)-[a-z]\b", text)
    main(["benchmark", "--help"])
    assert capsys.readouterr().out.startswith("usage: dgst-monai benchmark --output OUTPUT [--datalist DATALIST]")
