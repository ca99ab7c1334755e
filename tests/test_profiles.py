"""The synthetic benchmark: determinism, distinct people, splits, rows that read back, the CLI."""
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmedit.bench import portraits
from mmedit.bench.profiles import ATTRIBUTES, FORGET_PERCENTS, generate, load, make_people, questions, split_people
from mmedit.cli.main import app
from mmedit.data.rows import read_jsonl
from mmedit.errors import MmeditError

PEOPLE = 20


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("bench") / "b", n_people=PEOPLE, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first = generate(tmp_path / "a", n_people=8, seed=3)
    second = generate(tmp_path / "b", n_people=8, seed=3)
    other = generate(tmp_path / "c", n_people=8, seed=4)
    files = _files(first.root)
    assert files == _files(second.root)
    assert {"profiles.json", "forget10.jsonl", "retain90.jsonl", "test10.jsonl", "images/p00.png",
            "parquet/forget_10.parquet", "parquet/test_15.parquet"} <= set(files)
    other_files = _files(other.root)
    assert [p.name for p in first.people] != [p.name for p in other.people]
    assert files["images/p00.png"] != other_files["images/p00.png"]
    assert files["forget10.jsonl"] != other_files["forget10.jsonl"]


def test_people_have_unique_names_and_distinct_looks(bench):
    names = [person.name for person in bench.people]
    assert len(set(names)) == PEOPLE
    looks = [person.look for person in bench.people]
    for index, look in enumerate(looks):
        for other in looks[index + 1:]:
            assert portraits.differences(look, other) >= portraits.MIN_DIFFERENCES
    # the canonical background comes from a small shared palette, so it cannot single a person out
    assert len({look.background for look in looks}) <= len(portraits.BACKGROUNDS) < PEOPLE


def test_portraits_differ_between_people_and_views_differ_from_the_portrait(bench):
    training = [_pixels(bench.root / f"images/{person.id}.png") for person in bench.people]
    assert training[0].shape == (32, 32, 3)
    for index, image in enumerate(training):
        for other in training[index + 1:]:
            assert np.abs(image - other).mean() > 3.0
    for person, image in zip(bench.people, training):
        for number in range(1, bench.n_views + 1):
            assert np.abs(_pixels(bench.root / f"images/{person.id}-view{number}.png") - image).mean() > 3.0


def test_test_views_never_reuse_the_training_background():
    rng = random.Random(0)
    for _ in range(20):
        look = portraits.random_look(rng)
        assert all(view.background != look.background for view in portraits.alternative_views(look, 5, rng))


def test_augment_is_seeded_random_and_sized():
    look = portraits.random_look(random.Random(1))
    first = portraits.augment(look, random.Random(5), size=40)
    again = portraits.augment(look, random.Random(5), size=40)
    other = portraits.augment(look, random.Random(6), size=40)
    assert first.size == (40, 40) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_splits_are_disjoint_nested_and_sized(bench):
    everyone = {person.id for person in bench.people}
    previous = set()
    for percent, expected in zip(FORGET_PERCENTS, (1, 2, 3)):  # 5/10/15 % of 20, at least one
        forget = set(bench.sets[f"forget{percent}"]["people"])
        retain = set(bench.sets[f"retain{100 - percent}"]["people"])
        assert len(forget) == expected
        assert forget.isdisjoint(retain) and forget | retain == everyone
        assert set(bench.sets[f"test{percent}"]["people"]) == forget
        assert previous <= forget
        previous = forget
    assert split_people(list(bench.people), seed=7) == {name: s["people"] for name, s in bench.sets.items()}


def test_every_jsonl_reads_back_into_the_rows_generated(bench):
    by_id = {person.id: person for person in bench.people}
    for split, described in bench.sets.items():
        rows = read_jsonl(bench.jsonl(split))
        expected = []
        for pid in described["people"]:
            images = ([bench.root / f"images/{pid}-view{n}.png" for n in range(1, bench.n_views + 1)]
                      if split.startswith("test") else [bench.root / f"images/{pid}.png"])
            expected += questions(by_id[pid], images, seed=7)
        assert [replace(row, where="") for row in rows] == expected, split


def test_rows_ask_each_attribute_three_ways_in_both_forms(bench):
    person = bench.people_in("forget10")[0]
    rows = [row for row in bench.rows("forget10") if row.entity == person.name]
    assert len(rows) == 3 * len(ATTRIBUTES)
    choice, generation, cloze = rows[:10], rows[10:20], rows[20:]
    for row, (attribute, (values, _, _)) in zip(choice, ATTRIBUTES.items()):
        assert row.answer == person.attributes[attribute] and row.answer in values
        assert len(set(row.options)) == 4 and set(row.options) <= set(values)
        assert row.options[row.correct] == row.answer
    assert all(row.task == "qa" and row.options is None for row in generation)
    assert all(row.task == "cloze" and "___" in row.question for row in cloze)
    for row in rows:
        assert "this person" in row.question.lower() and person.name not in row.question
        assert person.name in row.text_question and "this person" not in row.text_question.lower()
        assert "'s" not in row.question + row.text_question
    # the correct option's position is drawn, not fixed
    assert len({row.correct for row in bench.rows("retain90") if row.options}) == 4


def test_test_split_asks_the_forget_questions_with_other_pictures(bench):
    forget, test = bench.rows("forget10"), bench.rows("test10")
    assert [(r.id, r.question, r.text_question, r.answer, r.options) for r in forget] == \
        [(r.id, r.question, r.text_question, r.answer, r.options) for r in test]
    assert all(f.image != t.image and "-view" in t.image.name for f, t in zip(forget, test))
    assert len({row.image for row in test if row.entity == test[0].entity}) == bench.n_views


def test_load_gives_the_people_a_trainer_needs(bench):
    loaded = load(bench.root)
    assert loaded.people == tuple(make_people(PEOPLE, seed=7))
    person = loaded.person(loaded.people[3].name)
    assert portraits.portrait(person.look).tobytes() == Image.open(bench.root / f"images/{person.id}.png").tobytes()
    with pytest.raises(MmeditError, match="no person named"):
        loaded.person("Nobody Here")
    with pytest.raises(MmeditError, match="no split"):
        loaded.rows("forget50")


def test_second_call_reuses_and_other_contents_are_refused(tmp_path):
    root = tmp_path / "b"
    generate(root, n_people=6, seed=1)
    stamp = (root / "profiles.json").stat().st_mtime_ns
    assert generate(root, n_people=6, seed=1).root == root.resolve()
    assert (root / "profiles.json").stat().st_mtime_ns == stamp
    with pytest.raises(MmeditError, match="different or modified"):
        generate(root, n_people=6, seed=2)
    (root / "forget10.jsonl").write_text("tampered\n")
    with pytest.raises(MmeditError, match="different or modified"):
        generate(root, n_people=6, seed=1)
    assert generate(root, n_people=6, seed=2, force=True).seed == 2
    assert json.loads((root / "profiles.json").read_text())["seed"] == 2
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temp folders left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MmeditError, match="not an mmedit benchmark"):
        generate(other, n_people=6)
    assert (other / "notes.txt").read_text() == "mine"
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(MmeditError, match="exists and is not a directory"):  # even with force: one clear error
        generate(taken, n_people=6, force=True)
    assert taken.read_text() == "a file"


def test_bad_arguments_fail_before_writing(tmp_path):
    for kwargs, message in (({"n_people": 1}, "number of people"), ({"image_size": 8}, "image size"),
                            ({"n_views": 0}, "test views")):
        with pytest.raises(MmeditError, match=message):
            generate(tmp_path / "b", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_larger_images(tmp_path):
    info = generate(tmp_path / "b", n_people=4, seed=0, image_size=64, n_views=1)
    assert Image.open(info.root / "images/p00.png").size == (64, 64)
    assert Image.open(info.root / "images/p00-view1.png").size == (64, 64)


def test_cli_synth_writes_and_prints_the_splits(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "b"), "--people", "6", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "forget10" in result.output and "retain90" in result.output and "test15" in result.output
    assert load(tmp_path / "b").seed == 2
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "b"), "--people", "6", "--seed", "3"])
    assert result.exit_code == 1
    assert "--force" in result.output
