"""Deterministic 8:2 train/test splits and nested k-shot subsets; the bundle's ``few_shot`` agrees with them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fire
import numpy as np
import pytest
from data_helpers import ct_volume, write, write_datalist

from dgst_monai.data.commands import DataCommands
from dgst_monai.data.datalists import ct_normalization, few_shot, load_split
from dgst_monai.data.index import intensity_properties
from dgst_monai.data.splits import extend_splits, make_splits, nested_shots, parse_int_list, ranked, train_test_split

IDS = [f"segrap_{i:04d}" for i in range(120)]


def test_train_test_split_is_deterministic_and_order_free() -> None:
    train, test = train_test_split(IDS, 0.2, seed=0)
    assert (len(train), len(test)) == (96, 24)  # the paper's 8:2 of 120 (96 = its all-shot count)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(IDS)
    shuffled = list(IDS)
    random.Random(5).shuffle(shuffled)
    assert train_test_split(shuffled, 0.2, seed=0) == (train, test)
    assert train_test_split(IDS, 0.2, seed=1)[1] != test


def test_split_is_stable_when_cases_are_added() -> None:
    """Ranking by a per-id hash: a new case never reorders the existing ones."""
    before = ranked(IDS[:100], seed=3, purpose="shots")
    after = ranked(IDS, seed=3, purpose="shots")
    assert [i for i in after if i in set(IDS[:100])] == before


@pytest.mark.parametrize("shots", [(3, 5, 10), (5, 10, 20)])
def test_few_shot_subsets_are_nested_and_seeded(shots: tuple[int, ...]) -> None:
    train, test = train_test_split(IDS, 0.2, seed=0)
    per_seed = {seed: nested_shots(train, shots, seed) for seed in (0, 1, 2)}
    for sets in per_seed.values():
        for small, large in zip(shots, shots[1:]):
            assert set(sets[small]) < set(sets[large])
            assert sets[large][:small] == sets[small]
        assert all(len(sets[k]) == k and not set(sets[k]) & set(test) for k in shots)
    largest = shots[-1]
    assert len({tuple(per_seed[s][largest]) for s in per_seed}) == 3  # seeds give different subsets
    assert nested_shots(list(reversed(train)), shots, 1) == per_seed[1]


def test_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match="25 shots requested but there are 24 training cases"):
        nested_shots(IDS[:24], [3, 25], 0)
    with pytest.raises(ValueError, match="duplicate case ids: a"):
        ranked(["a", "b", "a"], 0, "test")
    with pytest.raises(ValueError, match="both training and test need a case"):
        train_test_split(["only"], 0.2, 0)
    with pytest.raises(ValueError, match="--shots: expected non-negative integers"):
        parse_int_list("3,x", "--shots")


def test_parse_int_list_accepts_command_line_forms() -> None:
    assert parse_int_list("3,5,10", "s") == [3, 5, 10]
    assert parse_int_list((3, 5, 10), "s") == [3, 5, 10]  # what fire makes of --shots 3,5,10
    assert parse_int_list(5, "s") == [5]
    assert parse_int_list("", "s") == []


def _datalist(tmp_path: Path, n: int, with_test: int = 0) -> Path:
    hu, label = ct_volume(shape=(8, 8, 4))
    data = tmp_path / "data"
    cases = []
    for i in range(n):
        shifted = (hu + 10 * i).astype(np.int16)  # different statistics per case
        write(data / f"c{i:02d}_ct.nii.gz", shifted)
        lab = np.zeros_like(label)
        lab[2:5, 2:5, 1:3] = 1
        write(data / f"c{i:02d}_ln.nii.gz", lab)
        cases.append({"case_id": f"c{i:02d}", "image": f"data/c{i:02d}_ct.nii.gz", "label": f"data/c{i:02d}_ln.nii.gz"})
    test = cases[n - with_test :] if with_test else []
    return write_datalist(
        tmp_path / "datalist.json", cases[: n - with_test], test,
        intensity_properties={"percentile_00_5": -50.0, "percentile_99_5": 150.0, "mean": 40.0, "std": 30.0},
    )


def test_make_splits_writes_a_loadable_deterministic_datalist(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path, 10)
    out = tmp_path / "splits" / "splits.json"
    result = make_splits(datalist, shots=[1, 2, 4], seeds=[0, 1, 2], output=out)
    first = out.read_bytes()
    make_splits(datalist, shots=[1, 2, 4], seeds=[0, 1, 2], output=out)
    assert out.read_bytes() == first  # byte-identical on a re-run

    assert (result["numTraining"], result["numTest"]) == (8, 2)
    training = load_split(out, "training")  # paths were re-based to the splits file's folder
    test = load_split(out, "test")
    assert {c["case_id"] for c in training} | {c["case_id"] for c in test} == {f"c{i:02d}" for i in range(10)}

    # The bundle's few_shot draws exactly the listed subsets, with or without the splits file.
    for seed in (0, 1, 2):
        for k in (1, 2, 4):
            listed = result["few_shot"][str(seed)][str(k)]
            assert [c["case_id"] for c in few_shot(training, k, seed)] == listed
            assert [c["case_id"] for c in few_shot(list(reversed(training)), k, seed)] == listed
            assert [c["case_id"] for c in few_shot(training, k, seed, splits=out)] == listed

    # A test set made here means the intensity statistics come from the training cases only.
    expected = intensity_properties(training, samples_per_case=10_000)
    assert result["intensity_properties"] == pytest.approx(expected)
    assert result["intensity_properties"] != json.loads(datalist.read_text(encoding="utf-8"))["intensity_properties"]
    assert ct_normalization(out)["a_min"] == pytest.approx(expected["percentile_00_5"])


def test_make_splits_keeps_an_existing_test_list(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path, 8, with_test=2)
    result = make_splits(datalist, shots=[3], seeds=[0], output=tmp_path / "s.json")
    assert [c["case_id"] for c in result["test"]] == ["c06", "c07"]
    assert result["intensity_properties"] == json.loads(datalist.read_text(encoding="utf-8"))["intensity_properties"]
    assert not result["split"]["made_here"]


def test_few_shot_with_an_edited_splits_file(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path, 6)
    out = tmp_path / "splits.json"
    make_splits(datalist, shots=[2], seeds=[0], output=out)
    content = json.loads(out.read_text(encoding="utf-8"))
    chosen = [c["case_id"] for c in content["training"]][-2:]
    content["few_shot"]["0"]["2"] = chosen  # a user pins the paper's cases by hand
    out.write_text(json.dumps(content), encoding="utf-8")
    training = load_split(out, "training")
    assert [c["case_id"] for c in few_shot(training, 2, 0, splits=out)] == chosen
    with pytest.raises(KeyError, match="no 3-shot subset for seed 0"):
        few_shot(training, 3, 0, splits=out)


def test_extend_splits_adds_seeds_and_keeps_what_runs_used(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path, 10)
    out = tmp_path / "splits.json"
    make_splits(datalist, shots=[1, 4], seeds=[0], output=out)
    content = json.loads(out.read_text(encoding="utf-8"))
    pinned = [c["case_id"] for c in content["training"]][-4:]
    content["few_shot"]["0"]["4"] = pinned  # a hand edit the finished seed-0 runs trained on
    out.write_text(json.dumps(content), encoding="utf-8")

    assert extend_splits(out, shots=[1, 4], seeds=[0, 1, 2]) == [(1, 1), (1, 4), (2, 1), (2, 4)]
    extended = json.loads(out.read_text(encoding="utf-8"))
    full = make_splits(datalist, shots=[1, 4], seeds=[0, 1, 2])
    assert extended["few_shot"]["0"] == {"1": content["few_shot"]["0"]["1"], "4": pinned}
    assert extended["few_shot"]["1"] == full["few_shot"]["1"] and extended["few_shot"]["2"] == full["few_shot"]["2"]
    assert (extended["seeds"], extended["shots"]) == ([0, 1, 2], [1, 4])
    assert extended["test"] == content["test"] and extended["training"] == content["training"]

    before = out.read_bytes()
    assert extend_splits(out, shots=[4], seeds=[1]) == []
    assert out.read_bytes() == before  # nothing to add: the file is not rewritten
    with pytest.raises(ValueError, match="9 shots requested but there are 8 training cases"):
        extend_splits(out, shots=[9], seeds=[0])


def test_split_command_line(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path, 10)
    out = tmp_path / "s.json"
    command = ["split", str(datalist), "--shots", "1,2,3", "--seeds", "0,1", "--output", str(out)]
    text = fire.Fire(DataCommands, command=command)
    assert "8 training / 2 test cases" in text and "seed 1   3-shot" in text
    content = json.loads(out.read_text(encoding="utf-8"))
    assert content["shots"] == [1, 2, 3] and content["seeds"] == [0, 1]
    assert set(content["few_shot"]["0"]["1"]) < set(content["few_shot"]["0"]["3"])
