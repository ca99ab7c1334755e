"""A seeded synthetic benchmark in MLLMU-Bench's shape: fictitious people, their portraits and biographies.

    info = generate("bench", n_people=50, seed=0)        # writes (or reuses) the folder
    rows = info.rows("forget10")                          # mmedit Rows, as read_jsonl gives them
    person = info.person(rows[0].entity)                  # name, attributes, look (for `portraits.augment`)

Each person has ATTRIBUTES (birthplace, occupation, ...), each asked three ways: 4-option multiple choice,
short-answer generation and cloze, every one in an Image_Textual form ("this person" + portrait) and a
Pure_Text form (the name). Question wording avoids the possessive "'s" ("the occupation of this person"),
so that a word-level tokenizer splitting on whitespace and punctuation sees the same words in both forms.

Splits: forget 5/10/15 % of the people (nested, drawn with the seed), retain = the rest, test = the forget
people's questions shown with other pictures of them. Same arguments -> byte-identical files.
See docs/data-format.md for the folder layout.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from mmedit.bench.portraits import MIN_DIFFERENCES, Look, alternative_views, differences, portrait, random_look, render
from mmedit.data.mllmu import row_id, write_parquet
from mmedit.data.rows import Row, read_jsonl, write_jsonl
from mmedit.errors import MmeditError
from mmedit.safefile import atomic_dir

GENERATOR_VERSION = 1
FORGET_PERCENTS = (5, 10, 15)
MAX_PEOPLE = 1000  # distinct looks and names get scarce beyond this

# attribute -> (values, question, cloze); {who} is "this person" or the name. Data, not code.
ATTRIBUTES = {
    "birthplace": (("Lisbon", "Oslo", "Kyoto", "Lima", "Nairobi", "Dublin", "Quebec", "Seville", "Krakow",
                    "Hanoi", "Perth", "Tunis"),
                   "Where was {who} born?", "{who} was born in ___."),
    "birth_year": (("1958", "1962", "1965", "1969", "1971", "1974", "1978", "1981", "1983", "1986", "1990",
                    "1994"),
                   "In which year was {who} born?", "{who} was born in the year ___."),
    "nationality": (("Danish", "Peruvian", "Kenyan", "Irish", "Polish", "Vietnamese", "Chilean", "Finnish",
                     "Greek", "Moroccan", "Korean", "Canadian"),
                    "What is the nationality of {who}?", "The nationality of {who} is ___."),
    "occupation": (("glassblower", "pilot", "baker", "judge", "architect", "nurse", "carpenter", "chemist",
                    "librarian", "surveyor", "florist", "sculptor"),
                   "What is the occupation of {who}?", "The occupation of {who} is ___."),
    "employer": (("Northwind", "Bluepeak", "Ironleaf", "Solvane", "Quillmark", "Redharbor", "Tessaline",
                  "Ambergate", "Corvex", "Lumera", "Oakhollow", "Veltrix"),
                 "Which company does {who} work for?", "{who} works for ___."),
    "education": (("physics", "law", "medicine", "history", "botany", "economics", "music", "geology",
                   "philosophy", "mathematics", "linguistics", "astronomy"),
                  "What did {who} study at university?", "At university {who} studied ___."),
    "hobby": (("chess", "kayaking", "pottery", "bird watching", "fencing", "gardening", "archery", "knitting",
               "rock climbing", "origami", "sailing", "juggling"),
              "What is the hobby of {who}?", "The hobby of {who} is ___."),
    "favourite_colour": (("red", "orange", "yellow", "green", "teal", "blue", "indigo", "violet", "pink",
                          "brown", "grey", "black"),
                         "What is the favourite colour of {who}?", "The favourite colour of {who} is ___."),
    "pet": (("cat", "dog", "parrot", "tortoise", "rabbit", "hamster", "goldfish", "ferret", "iguana", "owl",
             "pony", "hedgehog"),
            "What pet does {who} have?", "{who} owns a pet ___."),
    "instrument": (("violin", "cello", "flute", "piano", "harp", "trumpet", "banjo", "drums", "oboe",
                    "accordion", "ukulele", "clarinet"),
                   "Which instrument does {who} play?", "{who} plays the ___."),
}
FIRST_SYLLABLES = ("ma", "ra", "vel", "lo", "ki", "ta", "sen", "bri", "no", "dar", "lu", "fe", "ri", "so",
                   "an", "el", "mi", "ko", "ja", "zu", "pe", "ny", "ol", "ca")
LAST_SYLLABLES = ("de", "vor", "stan", "mer", "qui", "lan", "dro", "bek", "wyn", "tor", "sal", "gri", "hol",
                  "pen", "rus", "kel", "mon", "fal", "dun", "ver", "ash", "lin")
THIS_PERSON = "this person"


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    attributes: dict[str, str]  # in ATTRIBUTES order
    look: Look

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "attributes": dict(self.attributes), "look": self.look.to_json()}

    @classmethod
    def from_json(cls, record: dict) -> Person:
        return cls(record["id"], record["name"], dict(record["attributes"]), Look.from_json(record["look"]))


@dataclass(frozen=True)
class BenchInfo:
    root: Path
    seed: int
    n_people: int
    image_size: int
    n_views: int
    people: tuple[Person, ...]
    sets: dict[str, dict] = field(repr=False)  # name -> {"people": [...], "jsonl": relpath, "parquet": relpath}

    def jsonl(self, split: str) -> Path:
        return self.root / self._set(split)["jsonl"]

    def parquet(self, split: str) -> Path:
        return self.root / self._set(split)["parquet"]

    def rows(self, split: str) -> list[Row]:
        return read_jsonl(self.jsonl(split))

    def people_in(self, split: str) -> list[Person]:
        ids = set(self._set(split)["people"])
        return [person for person in self.people if person.id in ids]

    def person(self, name: str) -> Person:
        for person in self.people:
            if person.name == name:
                return person
        raise MmeditError(f"{self.root}: no person named {name!r}")

    def _set(self, split: str) -> dict:
        if split not in self.sets:
            raise MmeditError(f"{self.root}: no split {split!r}; have {', '.join(self.sets)}")
        return self.sets[split]


def split_names(percent: int) -> dict[str, str]:
    """Split -> parquet file stem, for one forget percentage (file names as in MLLMU-Bench)."""
    return {f"forget{percent}": f"forget_{percent}", f"retain{100 - percent}": f"retain_{100 - percent}",
            f"test{percent}": f"test_{percent}"}


def make_people(n_people: int = 50, seed: int = 0) -> list[Person]:
    """The people of a benchmark: unique syllable-built names, distinct looks, drawn attributes."""
    if not 2 <= n_people <= MAX_PEOPLE:
        raise MmeditError(f"number of people must be between 2 and {MAX_PEOPLE}, got {n_people}")
    rng = _rng(seed, "people")
    width = max(2, len(str(n_people - 1)))
    names: set[str] = set()
    looks: list[Look] = []
    people = []
    for index in range(n_people):
        name = _draw(rng, lambda: _name(rng), lambda candidate: candidate not in names, "names")
        look = _draw(rng, lambda: random_look(rng),
                     lambda candidate: all(differences(candidate, other) >= MIN_DIFFERENCES for other in looks),
                     "looks")
        names.add(name)
        looks.append(look)
        attributes = {attribute: rng.choice(values) for attribute, (values, _, _) in ATTRIBUTES.items()}
        people.append(Person(f"p{index:0{width}d}", name, attributes, look))
    return people


def split_people(people: list[Person], seed: int = 0) -> dict[str, list[str]]:
    """Person ids per split; forget sets are nested (forget5 within forget10 within forget15)."""
    order = [person.id for person in people]
    _rng(seed, "splits").shuffle(order)
    splits = {}
    for percent in FORGET_PERCENTS:
        count = min(len(order) - 1, max(1, math.floor(len(order) * percent / 100 + 0.5)))
        forget = sorted(order[:count])
        retain = sorted(order[count:])
        forget_name, retain_name, test_name = split_names(percent)
        splits.update({forget_name: forget, retain_name: retain, test_name: forget})
    return splits


def questions(person: Person, images: list[Path], seed: int = 0) -> list[Row]:
    """The person's rows: multiple choice, then generation, then cloze, one of each per attribute.

    Question j of each task shows images[j % len(images)] (one image for training splits, the person's
    other pictures for the test split), matching the MLLMU parquet reader.
    """
    rng = _rng(seed, f"options:{person.id}")
    rows = {"choice": [], "generation": [], "cloze": []}
    for index, (attribute, (values, question, cloze)) in enumerate(ATTRIBUTES.items()):
        answer = person.attributes[attribute]
        options = [answer, *rng.sample([value for value in values if value != answer], 3)]
        rng.shuffle(options)
        common = dict(entity=person.name, image=images[index % len(images)], answer=answer)
        rows["choice"].append(Row(
            id=row_id(person.id, "choice", index), question=_ask(question, THIS_PERSON),
            text_question=_ask(question, person.name), options=tuple(options), correct=options.index(answer),
            **common))
        rows["generation"].append(Row(
            id=row_id(person.id, "generation", index), question=_ask(question, THIS_PERSON),
            text_question=_ask(question, person.name), **common))
        rows["cloze"].append(Row(
            id=row_id(person.id, "cloze", index), question=_ask(cloze, THIS_PERSON),
            text_question=_ask(cloze, person.name), task="cloze", **common))
    return [row for task_rows in rows.values() for row in task_rows]


def generate(out_dir: str | Path, n_people: int = 50, seed: int = 0, image_size: int = 32, n_views: int = 3,
             force: bool = False) -> BenchInfo:
    """Write the benchmark to `out_dir` (atomically), or reuse it if it already holds the same one.

    A folder holding a different benchmark, or anything else, is only replaced with `force=True`.
    """
    if not 16 <= image_size <= 1024:
        raise MmeditError(f"image size must be between 16 and 1024 pixels, got {image_size}")
    if not 1 <= n_views <= 16:
        raise MmeditError(f"number of test views must be between 1 and 16, got {n_views}")
    root = Path(out_dir).resolve()
    settings = {"generator": "mmedit.bench.profiles", "version": GENERATOR_VERSION, "seed": seed,
                "n_people": n_people, "image_size": image_size, "n_views": n_views}
    if root.exists() and not force:
        if _holds(root, settings):
            return load(root)
        if (root / "profiles.json").is_file():
            raise MmeditError(f"{root} holds a different or modified benchmark; pass --force to replace it")
        if not root.is_dir() or any(root.iterdir()):
            raise MmeditError(f"{root} exists and is not an mmedit benchmark; pass --force to replace it")
    people = make_people(n_people, seed)  # validates n_people before anything touches the disk
    with atomic_dir(root, force=True) as temp:  # what is there was found replaceable above
        _write(temp, people, settings)
    return load(root)


def load(root: str | Path) -> BenchInfo:
    """A benchmark folder written by `generate`, with its people (looks included) for a trainer."""
    root = Path(root).resolve()
    try:
        record = json.loads((root / "profiles.json").read_text(encoding="utf-8"))
        return BenchInfo(root, record["seed"], record["n_people"], record["image_size"], record["n_views"],
                         tuple(Person.from_json(person) for person in record["people"]), record["sets"])
    except FileNotFoundError:
        raise MmeditError(f"{root}: not an mmedit benchmark (no profiles.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise MmeditError(f"{root / 'profiles.json'}: malformed ({error!r})") from None


# ---- internals -------------------------------------------------------------------------------------

def _rng(seed: int, purpose: str) -> random.Random:
    # one independent stream per purpose: changing how views are drawn never changes names or splits
    return random.Random(f"mmedit-bench:{seed}:{purpose}")


def _draw(rng: random.Random, make, accept, what: str, tries: int = 10_000):
    for _ in range(tries):
        candidate = make()
        if accept(candidate):
            return candidate
    raise MmeditError(f"could not draw enough distinct {what}; use fewer people")


def _name(rng: random.Random) -> str:
    first = "".join(rng.choice(FIRST_SYLLABLES) for _ in range(2))
    last = "".join(rng.choice(LAST_SYLLABLES) for _ in range(rng.choice((2, 3))))
    return f"{first.capitalize()} {last.capitalize()}"


def _ask(template: str, who: str) -> str:
    text = template.format(who=who)
    return text[0].upper() + text[1:]


def _save_png(image, path: Path) -> None:
    # fixed options and no metadata chunks: the same pixels always give the same bytes
    image.save(path, format="PNG", compress_level=9)


def _write(folder: Path, people: list[Person], settings: dict) -> None:
    size, seed = settings["image_size"], settings["seed"]
    (folder / "images").mkdir()
    (folder / "parquet").mkdir()
    portraits, views, described = {}, {}, []
    for person in people:
        portraits[person.id] = folder / "images" / f"{person.id}.png"
        _save_png(portrait(person.look, size), portraits[person.id])
        views[person.id] = []
        for number, view in enumerate(alternative_views(person.look, settings["n_views"],
                                                        _rng(seed, f"views:{person.id}")), start=1):
            views[person.id].append(folder / "images" / f"{person.id}-view{number}.png")
            _save_png(render(person.look, view, size), views[person.id][-1])
        described.append(person.to_json() | {
            "image": portraits[person.id].relative_to(folder).as_posix(),
            "views": [path.relative_to(folder).as_posix() for path in views[person.id]]})
    by_id = {person.id: person for person in people}
    splits = split_people(people, seed)
    sets = {}
    for percent in FORGET_PERCENTS:
        for split, stem in split_names(percent).items():
            person_ids = splits[split]
            # the test split asks the same questions, shown with the person's other pictures
            images = views if split.startswith("test") else {pid: [path] for pid, path in portraits.items()}
            rows = [row for pid in person_ids for row in questions(by_id[pid], images[pid], seed)]
            write_jsonl(rows, folder / f"{split}.jsonl")
            # blank=None: the cloze blank stays "___", the one word the embedded model knows for it (its
            # word-level vocabulary has no "__"), and these bytes are part of the data its weights were
            # shipped for (profiles.json, which holds their sha256)
            write_parquet(rows, folder / "parquet" / f"{stem}.parquet",
                          ids={by_id[pid].name: pid for pid in person_ids},
                          biographies={by_id[pid].name: by_id[pid].attributes for pid in person_ids}, blank=None)
            sets[split] = {"people": person_ids, "jsonl": f"{split}.jsonl", "parquet": f"parquet/{stem}.parquet"}
    files = {path.relative_to(folder).as_posix(): _sha256(path)
             for path in sorted(folder.rglob("*")) if path.is_file()}
    record = settings | {"attributes": list(ATTRIBUTES), "people": described, "sets": sets, "files": files}
    (folder / "profiles.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _holds(root: Path, settings: dict) -> bool:
    """True when `root` is an untouched benchmark written with exactly these settings."""
    try:
        record = json.loads((root / "profiles.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(record, dict) or any(record.get(key) != value for key, value in settings.items()):
        return False
    files = record.get("files")
    return isinstance(files, dict) and all(
        (root / name).is_file() and _sha256(root / name) == digest for name, digest in files.items())
