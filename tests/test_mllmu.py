"""MLLMU-Bench parquet: our writer round-trips, hand-built files in the hub's schema and folder layout read
(sharded sets, Test_Set filtered to a forget set's IDs, prose or JSON biographies), bad input fails in one line."""
import io
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmedit.bench.profiles import generate
from mmedit.cli.main import app
from mmedit.data.mllmu import read_parquet, read_rows, row_id, write_parquet
from mmedit.data.rows import Row, read_jsonl, write_jsonl
from mmedit.errors import MmeditError


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _same(a: list[Row], b: list[Row]) -> bool:
    """Equal up to `where` and to which copy of an image file a row points at."""
    def key(row):
        return replace(row, where="", image=None), None if row.image is None else Path(row.image).read_bytes()
    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))


def _choice(question, answer_letter="B"):
    return {"Question": question, "Options": {"A": "Lima", "B": "Oslo", "C": "Perth", "D": "Hanoi"},
            "Correct_Answer": answer_letter}


def _profile(**overrides) -> dict:
    record = {
        "ID": "7",
        "image": {"bytes": _png((200, 10, 10)), "path": "7.png"},
        "biography": json.dumps({"Name": "Ola Nordmann", "Born": "Oslo"}),
        "metadata": json.dumps([{"Question": "Where was the person in the image born?", "Answer": "Oslo"},
                                {"Question": "Describe the photo.", "Answer": "A portrait."}]),
        "Classification_Task": {
            "Image_Textual_Questions": [_choice("Where was this person born?")],
            "Pure_Text_Questions": [_choice("Where was Ola Nordmann born?")],
        },
        "Generation_Task": [
            {"Type": "Pure_Text", "Question": "What does Ola Nordmann do?", "Ground_Truth": "He bakes bread."},
            {"Type": "Image_Textual", "Question": "What does this person do?", "Ground_Truth": "He bakes bread."},
        ],
        "Mask_Task": [
            {"Type": "Image_Textual", "Question": "This person was born in __.", "Ground_Truth": "Oslo"},
            {"Type": "Pure_Text", "Question": "Ola Nordmann was born in __.", "Ground_Truth": "Oslo"},
        ],
    }
    record.update(overrides)
    return record


def _write_hub_file(path: Path, records: list[dict]) -> Path:
    """A parquet file built the way the hub's is: pyarrow infers the nested struct types."""
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("bench") / "b", n_people=12, seed=5)


def test_generated_parquet_reads_as_the_jsonl_rows(bench):
    for split in ("forget10", "retain90", "test10"):  # test10 exercises the `images` column
        assert _same(read_parquet(bench.parquet(split)), bench.rows(split)), split
    assert "images" in pq.read_schema(bench.parquet("test10")).names
    assert "images" not in pq.read_schema(bench.parquet("forget10")).names


def test_write_then_read_gives_the_same_rows(tmp_path):
    image = tmp_path / "face.png"
    image.write_bytes(_png((1, 2, 3)))
    rows = [
        Row("x", "Ann Lee", image, "What is the pet of this person?", "What is the pet of Ann Lee?", "owl",
            ("owl", "cat", "dog"), 0),  # three options: D stays empty
        Row("y", "Ann Lee", image, "What is the hobby of this person?", "What is the hobby of Ann Lee?", "chess"),
        Row("z", "Ann Lee", image, "This person plays the ___.", "Ann Lee plays the ___.", "harp", task="cloze"),
        Row("w", "Bo Ek", None, "Where does this person live?", "Where does Bo Ek live?", "Umea"),
    ]
    path = tmp_path / "set.parquet"
    write_parquet(rows, path, ids={"Ann Lee": "a1"})
    back = read_parquet(path)
    mllmu_blank = replace(rows[2], id=row_id("a1", "cloze", 0), question="This person plays the __.",
                          text_question="Ann Lee plays the __.")  # written with MLLMU-Bench's blank
    expected = [replace(rows[0], id=row_id("a1", "choice", 0)), replace(rows[1], id=row_id("a1", "generation", 0)),
                mllmu_blank, replace(rows[3], id=row_id("2", "generation", 0))]
    assert _same(back, expected)
    assert back[0].image.parent == tmp_path / "set.images"
    # written through JSONL and back, parquet rows stay the same rows
    write_jsonl(back, tmp_path / "set.jsonl")
    assert _same(read_jsonl(tmp_path / "set.jsonl"), back)


def test_writer_refuses_what_the_schema_cannot_hold(tmp_path):
    image = tmp_path / "face.png"
    image.write_bytes(_png((1, 2, 3)))
    five = Row("x", "A B", image, "q this person", "q A B", "a", ("a", "b", "c", "d", "e"), 0)
    with pytest.raises(MmeditError, match="at most 4 options"):
        write_parquet([five], tmp_path / "five.parquet")
    mixed = [Row("x", "A B", image, "q1", "t1", "a"), Row("y", "A B", None, "q2", "t2", "b")]
    with pytest.raises(MmeditError, match="image layout"):
        write_parquet(mixed, tmp_path / "mixed.parquet")
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*"))


def test_hand_written_hub_file_reads(tmp_path):
    path = _write_hub_file(tmp_path / "forget_5.parquet", [_profile()])
    rows = read_parquet(path)
    assert [row.id for row in rows] == ["7-choice-0", "7-gen-0", "7-cloze-0"]
    choice, generation, cloze = rows
    assert choice.entity == "Ola Nordmann"
    assert choice.question == "Where was this person born?"
    assert choice.text_question == "Where was Ola Nordmann born?"
    assert choice.options == ("Lima", "Oslo", "Perth", "Hanoi") and choice.correct == 1 and choice.answer == "Oslo"
    assert generation.question == "What does this person do?"  # paired by Type, whatever the order
    assert generation.text_question == "What does Ola Nordmann do?" and generation.answer == "He bakes bread."
    assert cloze.task == "cloze" and cloze.answer == "Oslo" and cloze.text_question.startswith("Ola Nordmann")
    assert Image.open(choice.image).getpixel((0, 0)) == (200, 10, 10)
    assert all(row.image == choice.image for row in rows)
    assert read_rows(path) == rows  # the dispatcher, and images are extracted once


def test_metadata_becomes_training_rows_with_named_twins(tmp_path):
    path = _write_hub_file(tmp_path / "f.parquet", [_profile()])
    rows = read_parquet(path, parts=("train",))
    assert [row.id for row in rows] == ["7-train-0", "7-train-1"]
    assert rows[0].text_question == "Where was Ola Nordmann born?"
    assert rows[1].text_question == "Ola Nordmann: Describe the photo."  # no referent to replace


def test_image_paths_and_image_lists(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "7.png").write_bytes(_png((0, 0, 255)))
    by_path = _write_hub_file(tmp_path / "p.parquet", [_profile(image={"bytes": None, "path": "pics/7.png"})])
    assert read_parquet(by_path)[0].image == tmp_path / "pics" / "7.png"
    views = [{"bytes": _png((0, 255, 0)), "path": "v1.png"}, {"bytes": _png((0, 0, 0)), "path": "v2.png"}]
    two = [_choice("Where was this person born?"), _choice("Where did this person grow up?")]
    record = _profile(images=views, Classification_Task={"Image_Textual_Questions": two,
                                                         "Pure_Text_Questions": two})
    rows = read_parquet(_write_hub_file(tmp_path / "t.parquet", [record]), image_dir=tmp_path / "cache")
    colours = [Image.open(row.image).getpixel((0, 0)) for row in rows if row.options]
    assert colours == [(0, 255, 0), (0, 0, 0)]  # question j shows picture j mod 2
    assert rows[0].image.parent == tmp_path / "cache"
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(MmeditError, match="cannot extract images to .*taken.*not a writable folder.*pass image_dir"):
        read_parquet(tmp_path / "t.parquet", image_dir=tmp_path / "taken")


@pytest.mark.parametrize("overrides, message", [
    ({"biography": json.dumps({"Born": "Oslo"}), "Classification_Task": {  # no Name to make the text twin
        "Image_Textual_Questions": [_choice("Where was this person born?")], "Pure_Text_Questions": []}},
     "no Pure_Text form, and the biography gives no \"Name\""),
    ({"biography": "{not json"}, "not valid JSON"),
    ({"biography": "[" * 100_000 + "]" * 100_000}, "not readable JSON \\(nested too deeply\\)"),
    ({"image": {"bytes": b"not an image", "path": None}}, "not a readable image"),
    ({"image": {"bytes": None, "path": "missing.png"}}, "image not found"),
    ({"Classification_Task": {"Image_Textual_Questions": [_choice("q", "E")], "Pure_Text_Questions": []}},
     "Correct_Answer"),
    ({"Generation_Task": [{"Type": "Audio", "Question": "q", "Ground_Truth": "a"}]}, "Type must be"),
    ({"Mask_Task": [{"Type": "Pure_Text", "Question": "q __", "Ground_Truth": None}]}, "lacks 'Ground_Truth'"),
])
def test_malformed_rows_fail_naming_file_and_row(tmp_path, overrides, message):
    path = _write_hub_file(tmp_path / "bad.parquet", [_profile(ID="1"), _profile(ID="2", **overrides)])
    with pytest.raises(MmeditError, match=message) as caught:
        read_parquet(path)
    text = str(caught.value)
    assert text.count(str(path)) == 1 and "row 1" in text and "'2'" in text and "\n" not in text


def test_jsonl_that_is_not_utf8_or_nested_too_deep_is_one_line(tmp_path):
    """Invalid UTF-8 and 100k levels of nesting in a JSONL set: one error naming the file (and line)."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "caf\xe9"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text("\n" + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    for path, message in ((latin, r"latin.jsonl: not UTF-8 text \(invalid continuation byte at byte 11\)"),
                          (deep, r"deep.jsonl:2 is not readable JSON \(nested too deeply\)")):
        with pytest.raises(MmeditError, match=message) as caught:
            read_rows(path)
        assert "\n" not in str(caught.value)


def test_bad_files(tmp_path):
    missing_columns = _write_hub_file(tmp_path / "m.parquet", [{"ID": "1", "image": None}])
    with pytest.raises(MmeditError, match="missing MLLMU-Bench column.*Classification_Task or Generation_Task or "
                                          "Mask_Task"):
        read_parquet(missing_columns)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(MmeditError, match="not a readable parquet"):
        read_rows(tmp_path / "junk.parquet")
    with pytest.raises(MmeditError, match="unknown data format"):
        read_rows(tmp_path / "set.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmeditError, match="no .parquet files"):
        read_rows(tmp_path / "empty")
    with pytest.raises(MmeditError, match="unknown MLLMU part"):
        read_parquet(missing_columns, parts=("quiz",))


def test_folder_of_parquet_files_reads_in_name_order(tmp_path):
    folder = tmp_path / "Test_Set"
    folder.mkdir()
    _write_hub_file(folder / "b.parquet", [_profile(ID="2")])
    _write_hub_file(folder / "a.parquet", [_profile(ID="1")])
    assert [row.id.split("-")[0] for row in read_rows(folder)] == ["1", "1", "1", "2", "2", "2"]


def test_cli_show_prints_rows_and_counts(bench, tmp_path):
    runner = CliRunner()
    for file in (bench.jsonl("forget10"), bench.parquet("forget10")):
        result = runner.invoke(app, ["data", "show", str(file), "-n", "2"])
        assert result.exit_code == 0, result.output
        assert "counts" in result.output and "choice-0" in result.output
    result = runner.invoke(app, ["data", "show", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "not found" in result.output


def _bomb(side: int) -> bytes:
    """A small PNG whose header claims side x side pixels (a decompression bomb: PIL raises above 2 x 89M
    pixels and only warns between 89M and that)."""
    import struct
    import zlib

    data = bytearray(_png((1, 2, 3)))
    header = struct.pack(">II", side, side) + bytes(data[24:29])  # IHDR: width, height, then the rest
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize("side", [40_000, 10_000])
def test_decompression_bomb_is_one_line_in_parquet_and_jsonl(tmp_path, side):
    from mmedit.data.batches import _open_image  # where every multimodal batch opens its images
    from mmedit.data.rows import write_jsonl

    path = _write_hub_file(tmp_path / "bomb.parquet", [_profile(image={"bytes": _bomb(side), "path": "b.png"})])
    with pytest.raises(MmeditError, match="row 0.*not a readable image.*decompression bomb") as caught:
        read_parquet(path)
    assert "\n" not in str(caught.value)
    rows = read_parquet(_write_hub_file(tmp_path / "fine.parquet", [_profile()]))
    (tmp_path / "bomb.png").write_bytes(_bomb(side))
    write_jsonl([replace(rows[0], image=tmp_path / "bomb.png")], tmp_path / "bomb.jsonl")
    with pytest.raises(MmeditError, match="cannot read image .*bomb.png.*decompression bomb") as caught:
        _open_image(read_rows(tmp_path / "bomb.jsonl")[0])
    assert "\n" not in str(caught.value)


def test_a_bad_file_leaves_no_image_cache_behind(tmp_path):
    """The <stem>.images/ folder a read creates goes again when a later row is bad; one that was there stays."""
    path = _write_hub_file(tmp_path / "bad.parquet", [_profile(ID="1"), _profile(ID="2", biography="{not json")])
    with pytest.raises(MmeditError, match="row 1"):
        read_parquet(path)
    assert not (tmp_path / "bad.images").exists()
    (tmp_path / "bad.images").mkdir()
    with pytest.raises(MmeditError, match="row 1"):
        read_parquet(path)
    assert (tmp_path / "bad.images").is_dir()  # not ours to remove
    result = CliRunner().invoke(app, ["data", "show", str(path), "--image-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1 and "row 1" in result.output and not (tmp_path / "cache").exists()


# ---- the hub's layout: a downloaded MLLMU-Bench folder ------------------------------------------------

PEOPLE = {"1": "Ola Nordmann", "2": "Kari Holm", "3": "Per Lund", "4": "Siri Dahl"}


def _published(profile_id: str, *, prose: bool, test: bool = False) -> dict:
    """A profile with the columns the hub's forget/retain/Test_Set files have (image, ID, biography,
    question, answer, the three tasks; `images` in Test_Set), its image structs holding PNG bytes."""
    name = PEOPLE[profile_id]
    shade = int(profile_id) * 40
    biography = (f"{name} was born in Oslo and bakes bread." if prose
                 else json.dumps({"Name": name, "Born": "Oslo"}))
    portrait = {"bytes": _png((shade, 0, 0)), "path": f"{profile_id}.png"}
    record = _profile(ID=profile_id, biography=biography, image=portrait,
                      question="What does this person do?", answer="He bakes bread.",
                      Classification_Task={"Image_Textual_Questions": [_choice("Where was this person born?")],
                                           "Pure_Text_Questions": [_choice(f"Where was {name} born?")]},
                      Mask_Task=[{"Type": "Image_Textual", "Question": "This person was born in __.",
                                  "Ground_Truth": "Oslo"},
                                 {"Type": "Pure_Text", "Question": f"{name} was born in __.", "Ground_Truth": "Oslo"}])
    del record["metadata"]  # only ft_Data has the fine-tuning QA
    if test:
        record["images"] = [{"bytes": _png((shade, 255, view)), "path": f"{profile_id}_pose{view}.png"}
                            for view in (1, 2)]
    return record


@pytest.fixture
def hub(tmp_path):
    """MLLMU-Bench as `huggingface-cli download MLLMMU/MLLMU-Bench` leaves it, four profiles small."""
    root = tmp_path / "MLLMU-Bench"
    layout = {"forget_5": ["1"], "forget_10": ["1", "2"], "retain_95": ["2", "3", "4"], "retain_90": ["3", "4"]}
    for folder, ids in layout.items():
        (root / folder).mkdir(parents=True)
        _write_hub_file(root / folder / "train-00000-of-00001.parquet",
                        [_published(pid, prose=pid in ("2", "4")) for pid in ids])
    (root / "Test_Set").mkdir()
    for shard, ids in enumerate((["3", "1"], ["4", "2"])):
        _write_hub_file(root / "Test_Set" / f"train-{shard:05d}-of-00002.parquet",
                        [_published(pid, prose=pid in ("2", "4"), test=True) for pid in ids])
    (root / "Retain_Set").mkdir()  # the real people: Full_Set and Retain_Set add a Directory column
    _write_hub_file(root / "Retain_Set" / "train-00000-of-00001.parquet",
                    [_published("3", prose=True) | {"Directory": "Retain_Set/3.png"}])
    return root


def _ids(rows):
    return list(dict.fromkeys(row.id.split("-")[0] for row in rows))


def test_published_forget_and_retain_sets_read_with_prose_or_json_biographies(hub):
    rows = read_rows(hub / "forget_10")
    assert _ids(rows) == ["1", "2"] and len(rows) == 6
    assert {row.entity for row in rows} == {"Ola Nordmann", "2"}  # JSON Name; a prose biography: the ID
    cloze = [row for row in rows if row.task == "cloze"]
    assert [row.question for row in cloze] == ["This person was born in __."] * 2  # MLLMU's blank, as stored
    assert cloze[1].text_question == "Kari Holm was born in __."
    assert Image.open(rows[0].image).getpixel((0, 0)) == (40, 0, 0)
    assert _ids(read_rows(hub / "retain_90")) == ["3", "4"]
    assert _ids(read_rows(hub / "Retain_Set")) == ["3"]  # the extra Directory column is ignored


def test_test_set_is_filtered_to_the_forget_ids_across_its_shards(hub, tmp_path):
    everyone = read_rows(hub / "Test_Set", image_dir=tmp_path / "all")
    assert _ids(everyone) == ["3", "1", "4", "2"]  # shards in name order, rows in file order
    cache = tmp_path / "cache"
    rows = read_rows(hub / "Test_Set", image_dir=cache, people_of=hub / "forget_10")
    assert _ids(rows) == ["1", "2"]
    assert _same(rows, [row for row in everyone if row.id.split("-")[0] in ("1", "2")])
    # question j shows the test picture j mod 2, never the training portrait
    assert [Image.open(row.image).getpixel((0, 0)) for row in rows if row.id.startswith("1-")] == [
        (40, 255, 1), (40, 255, 1), (40, 255, 1)]
    assert len(list(cache.iterdir())) == 4  # only the forget people's pictures were extracted
    assert _ids(read_rows(hub / "Test_Set", image_dir=cache, people_of=hub / "forget_5")) == ["1"]
    assert "row 1" in rows[0].where  # error locations keep the row's number in the file


def test_people_of_matches_entities_for_jsonl(bench):
    rows = read_rows(bench.jsonl("test15"), people_of=bench.jsonl("forget5"))
    forget = {row.entity for row in bench.rows("forget5")}
    assert {row.entity for row in rows} == forget and len(forget) < len({row.entity for row in bench.rows("test15")})
    assert rows == [row for row in bench.rows("test15") if row.entity in forget]


@pytest.mark.parametrize("damage, call, message", [
    (None, lambda hub: read_rows(hub), r"MLLMU-Bench dataset folder, not a set: name one of its sets, e\.g\. "
                                      r".*Retain_Set \(it has Retain_Set, Test_Set, forget_10, forget_5, retain_90"),
    (None, lambda hub: read_rows(hub / "forget_20"), r"data not found: .*forget_20 \(.*MLLMU-Bench has Retain_Set, "
                                                     r"Test_Set, forget_10"),
    ("shard", lambda hub: read_rows(hub / "Test_Set"),
     r"Test_Set: shard train-00000-of-00002\.parquet is missing \(1 of 2 there\); the download is incomplete"),
    ("stranger", lambda hub: read_rows(hub / "Test_Set", people_of=hub / "forget_10"),
     r"Test_Set lacks 1 of the 3 people of .*forget_10 \(e\.g\. ID '9'\)"),
    ("real", lambda hub: read_rows(hub / "Test_Set", people_of=hub / "Retain_Set"),
     r"Test_Set holds none of the people of .*Retain_Set \(no ID in common\)"),
    ("column", lambda hub: read_rows(hub / "forget_10"), r"forget_10/train-00000-of-00001\.parquet: missing "
                                                         r"MLLMU-Bench column\(s\) ID"),
])
def test_bad_hub_folders_are_one_line(hub, damage, call, message):
    if damage == "shard":
        (hub / "Test_Set" / "train-00000-of-00002.parquet").unlink()
    elif damage == "stranger":
        _write_hub_file(hub / "forget_10" / "train-00000-of-00001.parquet",
                        [_published("1", prose=False), _published("2", prose=True),
                         _published("1", prose=False) | {"ID": "9"}])
    elif damage == "column":
        table = pq.read_table(hub / "forget_10" / "train-00000-of-00001.parquet")
        pq.write_table(table.drop_columns(["ID"]), hub / "forget_10" / "train-00000-of-00001.parquet")
    elif damage == "real":  # real people, whom Test_Set does not hold
        _write_hub_file(hub / "Retain_Set" / "train-00000-of-00001.parquet",
                        [_published("1", prose=True) | {"ID": "77"}])
    with pytest.raises(MmeditError, match=message) as caught:
        call(hub)
    assert "\n" not in str(caught.value)


def test_cloze_blanks_for_mllmu_eval_and_the_old_blank(tmp_path):
    """Written parquet carries `__`, which MLLMU-Bench's eval.py turns into "[Blank]"; `blank=None` keeps the
    rows' own blank (the synthetic benchmark's `___`), and either reads back as written."""
    image = tmp_path / "face.png"
    image.write_bytes(_png((1, 2, 3)))
    rows = [Row("z", "Ann Lee", image, "This person plays the ___.", "Ann Lee plays the ___.", "harp", task="cloze"),
            Row("y", "Ann Lee", image, "In ____ this person moved to __ with a_b.",
                "In ____ Ann Lee moved to __ with a_b.", "1990", task="cloze")]
    write_parquet(rows, tmp_path / "mllmu.parquet")
    mask = pq.read_table(tmp_path / "mllmu.parquet").column("Mask_Task").to_pylist()[0]
    prompts = [entry["Question"].replace("__", "[Blank]") for entry in mask]  # what eval.py asks
    assert prompts[0] == "This person plays the [Blank]." and prompts[2] == "Ann Lee plays the [Blank]."
    assert prompts[1] == "In [Blank] this person moved to [Blank] with a_b."
    assert [row.question for row in read_parquet(tmp_path / "mllmu.parquet")] == [
        "This person plays the __.", "In __ this person moved to __ with a_b."]
    write_parquet(rows, tmp_path / "own.parquet", blank=None)
    assert _same(read_parquet(tmp_path / "own.parquet"),
                 [replace(row, id=row_id("1", "cloze", index)) for index, row in enumerate(rows)])


def test_cli_reads_a_published_set(hub, tmp_path):
    result = CliRunner().invoke(app, ["data", "show", str(hub / "Test_Set"), "-n", "1",
                                      "--image-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "3-choice-0" in result.output and (tmp_path / "cache").is_dir()
    result = CliRunner().invoke(app, ["data", "show", str(hub)])
    assert result.exit_code == 1 and "not a set" in result.output and "Traceback" not in result.output


def test_eval_reads_the_published_folder_as_downloaded(hub, tmp_path):
    """`mmedit eval MODEL --data MLLMU-Bench --forget 10`: forget_10, retain_90, and Test_Set kept to the
    forget set's people (the two others' pictures are not scored)."""
    from mmedit import zoo
    from mmedit.eval.harness import find_sets

    assert find_sets(hub, 10) == {"forget": hub / "forget_10", "test": hub / "Test_Set", "retain": hub / "retain_90"}
    model = zoo.tiny("llava", root=tmp_path / "zoo")
    result = CliRunner().invoke(app, ["eval", str(model), "--data", str(hub), "--forget", "10", "--device", "cpu",
                                      "--no-letters", "--image-dir", str(tmp_path / "images"),
                                      "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    sets = json.loads((tmp_path / "eval.json").read_text())["data"]["sets"]
    assert sets["test"]["people"] == sets["forget"]["people"] == 2 and sets["retain"]["people"] == 2
    assert sets["test"]["rows"] == len(read_rows(hub / "Test_Set", tmp_path / "x", people_of=hub / "forget_10"))
