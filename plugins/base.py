"""The plugin contract: a name, a dataclass config, the parts it may touch, and an in-place edit.

    class Halve(Plugin):
        name, version, description = "halve", "1.0", "Halve the projector's weights."
        Config = HalveConfig                       # a dataclass; every field has metadata help
        def parts(self, config): return ("projector",)
        def edit(self, job, config): ...           # change job.model in place, inside those parts

`apply_plugin` runs one: it checks the options, seeds every random generator, lets the plugin edit the
model in place, diffs what changed against its original values (job.original: kept before the change,
off the model's device) into a Delta, and then puts the original values back bit for bit — the caller's
model is the same before and after, whatever happens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mmedit.errors import MmeditError
from mmedit.plugins.originals import Originals

TYPES = (int, float, bool, str)  # the option types --set can parse
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class Range:
    """Where `mmedit sweep` searches a number option: low..high, both included, on a log scale when `log`
    (rates and weights that span decades). An int option takes int bounds."""
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """The values `mmedit sweep` tries for an option, none preferred."""
    values: tuple


def option(default, help: str, choices: Sequence | None = None, space: Range | Choice | None = None):
    """A config field with its help text (and allowed values, and where `mmedit sweep` searches it):
    `lr: float = option(1e-5, "Learning rate.", space=Range(1e-6, 1e-3, log=True))`."""
    metadata = {"help": help} | ({"choices": tuple(choices)} if choices else {}) | ({"space": space} if space else {})
    return field(default=default, metadata=metadata)


def require(condition: bool, name: str, must: str) -> None:
    """Range checks in a config's __post_init__: require(self.lr > 0, "lr", "be > 0")."""
    if not condition:
        raise MmeditError(f"option {name} must {must}")


class Plugin:
    """Base of every edit method; a package exposes one instance through the `mmedit.plugins` entry points."""

    name: str = ""
    version: str = "0"
    description: str = ""  # one line, shown by `mmedit plugins`
    Config: type = object  # a dataclass whose fields are the options, defaults = the paper's
    needs_retain: bool = True  # False: the retain set is optional
    # Named option sets that fit a setting the paper defaults do not, e.g. presets["embedded"]: the
    # settings `mmedit demo` runs on mmedit's tiny embedded model (trained at lr 1e-3, where the papers'
    # lr 1e-5 moves nothing). Each is a dict of option overrides, checked by configure() like --set.
    presets: Mapping[str, Mapping[str, object]] = {}
    stats_keys: tuple[str, ...] = ()  # the precomputed statistics it reads (apply_plugin(stats=...), --stats KEY=)
    # True: edit() calls job.original.keep(name, ...) before it changes a parameter (or its rows or elements),
    # so only that is copied. False: apply_plugin keeps every parameter of the declared parts whole first.
    keeps_originals: bool = False
    # Where `mmedit sweep` searches options this plugin inherits (e.g. TrainConfig's lr, forms), by name:
    # {"lr": Range(1e-5, 1e-2, log=True)}. Options it declares itself say it with option(space=...).
    search_space: Mapping[str, Range | Choice] = {}

    def parts(self, config) -> tuple[str, ...]:
        """The parts (vision, projector, llm) the edit may change; nothing outside them may move."""
        raise NotImplementedError

    def edit(self, job: Job, config) -> dict | None:
        """Change job.model in place, inside self.parts(config). May return a small JSON-able report
        (what was selected, how many steps...), stored in the delta's provenance."""
        raise NotImplementedError

    def objectives(self, config) -> list:
        """What the edit moves (mmedit.plugins.objectives.Objective), checked for every plugin by the
        conformance suite with presets["conformance"] on tiny models. A TrainingPlugin must declare some."""
        return []

    def footprint(self, model, shapes, config) -> list:
        """The memory the edit needs, for `mmedit plan`: a list of mmedit.plan.Phase, each the bytes held at
        that phase's peak, on `model` (mmedit.plan.Sized: the shapes, built on the meta device) and the
        data's `shapes` (mmedit.plan.Shapes). Default: the weights, and the declared parts kept whole."""
        from mmedit.plan import base_phase
        from mmedit.plugins.originals import footprint

        phase = base_phase(model, "edit")
        footprint(phase, model, {name: model.numel[name] for name in model.names(self.parts(config))})
        return [phase]

    def report_table(self, report: dict):
        """A rich renderable of edit()'s report for `mmedit apply` to print (None: nothing to show).
        Plugins do not print themselves, so that callers such as `mmedit demo` stay quiet."""
        return None

    # ---- options ------------------------------------------------------------------------------
    def options(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.Config))

    def configure(self, overrides: Mapping[str, object] | None = None):
        """Config from the defaults and `overrides` (strings from --set are parsed by the field's type)."""
        overrides = dict(overrides or {})
        names = [f.name for f in self.options()]
        unknown = [key for key in overrides if key not in names]
        if unknown:
            raise MmeditError(f"{self.name}: unknown option {unknown[0]!r}; options are {self.describe_options()}")
        hints = typing.get_type_hints(self.Config)
        values = {}
        for key, value in overrides.items():
            try:
                values[key] = _parse(value, hints[key], self._field(key).metadata.get("choices"))
            except ValueError as error:
                raise MmeditError(f"{self.name}: bad value for option {key}: {error}; "
                                  f"options are {self.describe_options()}") from None
        try:
            return self.Config(**values)
        except MmeditError as error:
            raise MmeditError(f"{self.name}: {error}; options are {self.describe_options()}") from None

    def check_stats_keys(self, keys) -> None:
        """Precomputed statistics this plugin does not read are one clear error, never silently ignored."""
        unknown = sorted(set(keys) - set(self.stats_keys))
        if unknown:
            reads = f"it reads {', '.join(self.stats_keys)}" if self.stats_keys else "it reads none"
            raise MmeditError(f"{self.name}: unknown statistics key {unknown[0]!r}; {reads}")

    def space(self) -> dict[str, Range | Choice]:
        """The options `mmedit sweep` searches and where: each option's option(space=...), then search_space
        (which wins). A range or choice that does not fit its option's type is a plugin bug, one error."""
        found = {f.name: f.metadata["space"] for f in self.options() if "space" in f.metadata}
        unknown = [name for name in self.search_space if name not in {f.name for f in self.options()}]
        if unknown:
            raise MmeditError(f"plugin {self.name}: search_space names {unknown[0]!r}, which is not an option")
        found.update(self.search_space)
        hints = typing.get_type_hints(self.Config)
        for name, where in found.items():
            problem = _space_problem(where, hints[name], self._field(name).metadata.get("choices"))
            if problem:
                raise MmeditError(f"plugin {self.name}: the search space of option {name} {problem}")
        return found

    def describe_options(self) -> str:
        return ", ".join(f"{f.name}={_show(f.default)}" for f in self.options())

    def _field(self, name: str) -> dataclasses.Field:
        return next(f for f in self.options() if f.name == name)

    def check(self) -> None:
        """The contract, checked when the registry loads a plugin."""
        if not self.name or not self.description or "\n" in self.description:
            raise MmeditError(f"{type(self).__name__}: a plugin needs a name and a one-line description")
        if not dataclasses.is_dataclass(self.Config):
            raise MmeditError(f"plugin {self.name}: Config must be a dataclass")
        hints = typing.get_type_hints(self.Config)
        for f in self.options():
            if not f.metadata.get("help"):
                raise MmeditError(f"plugin {self.name}: option {f.name} has no help text (field metadata 'help')")
            if hints[f.name] not in TYPES:
                raise MmeditError(f"plugin {self.name}: option {f.name} must be int, float, bool or str")


def _space_problem(where, kind: type, choices) -> str | None:
    """Why a Range or Choice cannot be searched for an option of type `kind` (None: it can)."""
    if isinstance(where, Range):
        bounds = (where.low, where.high)
        if kind not in (int, float) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in bounds):
            return f"is a range, but the option is {kind.__name__}" if kind not in (int, float) else "needs number bounds"
        if kind is int and not all(isinstance(x, int) for x in bounds):
            return "needs int bounds (the option is int)"
        if not where.low < where.high or (where.log and where.low <= 0):
            return f"must have low < high{' and low > 0 (log scale)' if where.log else ''}"
        return None
    if isinstance(where, Choice):
        if not where.values or any(type(value) is not kind for value in where.values):
            return f"needs one or more {kind.__name__} values"
        outside = [value for value in where.values if choices and value not in choices]
        return f"offers {outside[0]!r}, not one of the option's choices" if outside else None
    return "must be a Range or a Choice"


def _parse(value, kind: type, choices):
    if isinstance(value, str) and kind is not str:
        value = _from_text(value, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ValueError(f"expected {kind.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _from_text(text: str, kind: type):
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"expected bool (true/false), got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {kind.__name__}, got {text!r}") from None


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


@dataclass
class Job:
    """What a plugin's edit works on. `model` is edited in place; apply_plugin restores it afterwards."""

    model: torch.nn.Module
    processor: object
    model_map: object  # mmedit.arch.ModelMap
    forget: list  # Rows
    retain: list
    text_retain: list  # rows whose text-only form is preserved (default: forget + retain)
    seed: int
    progress: bool
    original: Originals  # θ₀'s values of the declared parts' parameters: keep() before changing; [name] reads
    stats: Mapping = field(default_factory=dict)  # precomputed TraceStats by key; see statistics()
    memo: dict | None = None  # this plugin's share of apply_plugin(memo=...); see statistics()
    sources: dict = field(default_factory=dict)  # key -> "precomputed", "computed" or "reused"
    stats_keys: tuple | None = None  # the plugin's declared Plugin.stats_keys (None: not checked)

    def statistics(self, key: str, compute: Callable, depends_on: Mapping | None = None, kind: type | None = None):
        """Precomputed statistics passed as stats[key], else compute() (e.g. a mmedit.trace.trace run).
        `kind`: the type a precomputed value must have (e.g. TraceStats; `mmedit apply --stats` passes
        files it cannot read as trace statistics through as paths).

        `depends_on`: every option the result depends on. Given that, and a memo (apply_plugin(memo=...),
        which is already specific to this plugin, base weights, seed and data), what compute() returns is
        kept and a later edit asking for the same key and options reuses it. Without it nothing is kept."""
        if self.stats_keys is not None and key not in self.stats_keys:
            raise MmeditError(f"statistics {key!r}: not in the plugin's stats_keys {list(self.stats_keys)} "
                              "(a plugin bug: declare every key it reads, so that --stats can offer it)")
        if key in self.stats:
            value = self.stats[key]
            if kind is not None and not isinstance(value, kind):
                raise MmeditError(f"statistics {key!r}: {value} is not a {kind.__name__} file (from `mmedit trace`)")
            self.sources[key] = "precomputed"
            return value
        if self.memo is None or depends_on is None:
            self.sources[key] = "computed"
            return compute()
        memo_key = (key, json.dumps(depends_on, sort_keys=True, default=str))
        self.sources[key] = "reused" if memo_key in self.memo else "computed"
        if memo_key not in self.memo:
            self.memo[memo_key] = compute()
        return self.memo[memo_key]


def rows_sha256(rows: Sequence) -> str:
    """A hash of the rows' content: every field, and the bytes of every image."""
    from mmedit.provenance import file_sha256

    digest = hashlib.sha256()
    for row in rows:
        record = dataclasses.asdict(row)
        record.pop("where")
        record["image"] = None if row.image is None else file_sha256(row.image)
        digest.update(json.dumps(record, sort_keys=True, default=list).encode() + b"\n")
    return digest.hexdigest()
