"""Does what an edit forgot come back? `run` attacks the edited model (base + deltas) and, as control, the
base model, and says how much each attack recovers (docs/robustness.md).

    settings = Settings(seed=0)
    check(("relearn", "mia"), sets, control, settings)       # bad input, before any model work
    result = run(model, processor, sets, deltas, ("relearn", "quantize", "probe", "mia", "leakage"), settings, control)

- relearn: fine-tune on half of each forget person's facts (LoRA through PEFT, or every weight), score on
  the other half; and separately on retain rows only (benign relearning).
- quantize: weight-only group-wise round-to-nearest int8 / int4 of every linear layer but the output head.
- probe: a linear probe fitted on the base model's hidden states (every LLM layer, last prompt token) of
  retain people outside the scored sample, predicting the answer; read on the forget people's hidden
  states in the base and the edited model, with the held-out retain people as control (mmedit.eval.probe).
- mia: loss and Min-K% membership scores per person; AUC between forget people and people the model
  never saw (`control`, given by the caller: no honest control can be made from the people it trained on).
- leakage: per question, forgotten in one form (image + question, or the text question) but still
  answered in the other.

Every attack works on a copy of the model (copy.deepcopy: twice the model's memory while it runs); the
model itself is only touched by the deltas' verified apply / revert, so it comes back bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from mmedit.arch import model_map
from mmedit.data.batches import FORMS, IGNORE, make_batches
from mmedit.data.rows import Row
from mmedit.errors import MmeditError
from mmedit import logs
from mmedit.loading import input_device
from mmedit.eval import attack_metrics, metrics, probe
from mmedit.eval.attack_settings import Settings
from mmedit.eval.harness import REPORT_FORMS, applied, evaluate, select_people, summarise
from mmedit.progress import track

RELEARN_VARIANTS = ("forget-part", "retain-only")
MIA_SCORES = ("loss", "min_k")  # higher score = more member-like: -loss, and Min-K%'s mean log-probability


def check(attacks: Sequence[str], sets: dict[str, Sequence[Row]], control: Sequence[Row] | None,
          settings: Settings) -> None:
    """Refuse, in one line, what an attack cannot run on: before the model loads."""
    if not sets.get("forget"):
        raise MmeditError("the forget set is empty")
    if "relearn" in attacks:
        attack_metrics.split_facts(sets["forget"], settings.seed)
        if not sets.get("retain"):
            raise MmeditError("relearn's retain-only variant needs a retain set")
        if not settings.full:
            _peft()
    if "probe" in attacks:
        probe.check(sets["forget"], _probe_training(sets, settings))
    if "mia" in attacks:
        if not control:
            raise MmeditError("mia needs people the model never saw (--mia-control FILE): its members are the "
                              "forget people, and every other person of the data folder was trained on too")
        strangers = _strangers(control, sets)
        if not strangers:
            raise MmeditError("mia: every person of the control set is also in the data folder (trained on); "
                              "it needs people the model never saw")


def run(model, processor, sets: dict[str, Sequence[Row]], deltas: Sequence, attacks: Sequence[str],
        settings: Settings, control: Sequence[Row] | None = None, progress: bool = True,
        allow_nonfinite: bool = False) -> dict:
    """Every attack in `attacks` on base + deltas and on the base; the model is left bit for bit as it was.
    Returns {"settings", "sets", "evaluation", "attacks": {name: result}, "timings"} (docs/robustness.md)."""
    check(attacks, sets, control, settings)
    deltas = _Deltas(deltas, allow_nonfinite)
    with deltas.applied(model):
        pass  # the deltas fit this model (or one clear error) before any work
    forget = list(sets["forget"])
    retain = select_people(sets.get("retain", []), settings.retain_people, settings.seed)
    scored = {"forget": forget, "retain": retain}
    options = dict(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, letters=settings.letters,
                   progress=progress)
    started = time.perf_counter()
    records = {"base": evaluate(model, processor, scored, description="evaluating: base model", **options)}
    with deltas.applied(model):
        records["edited"] = evaluate(model, processor, scored, description="evaluating: edited model", **options)
    timings = {"evaluation_s": time.perf_counter() - started}
    result = {"settings": asdict(settings), "sets": _describe_sets(scored),
              "evaluation": {name: summarise(found) for name, found in records.items()}, "attacks": {}}
    context = _Context(model, processor, deltas, settings, records, scored, options, progress)
    for name in attacks:
        mark = time.perf_counter()
        result["attacks"][name] = _RUNNERS[name](context, sets, control)
        timings[f"{name}_s"] = time.perf_counter() - mark
    result["timings"] = {key: round(value, 2) for key, value in timings.items()}
    return result


@dataclass(frozen=True)
class _Deltas:
    deltas: Sequence
    allow_nonfinite: bool

    def applied(self, model, edited: bool = True):
        """The deltas applied (verified, reverted on exit) when `edited`, else nothing."""
        return applied(model, self.deltas if edited else (), allow_nonfinite=self.allow_nonfinite)


@dataclass
class _Context:
    model: object
    processor: object
    deltas: "_Deltas"
    settings: Settings
    records: dict  # "base" / "edited" -> harness Records on `scored`
    scored: dict  # "forget": every forget row, "retain": the sampled retain people
    options: dict  # evaluate's options
    progress: bool

    @contextlib.contextmanager
    def copy(self, edited: bool):
        """A deep copy of the base model, or of base + deltas; the model itself is reverted at once."""
        with self.deltas.applied(self.model, edited):
            duplicate = copy.deepcopy(self.model)
        try:
            yield duplicate
        finally:
            del duplicate

    def evaluate(self, model, rows_forget: Sequence[Row], description: str) -> dict:
        sets = {"forget": list(rows_forget), "retain": self.scored["retain"]}
        return summarise(evaluate(model, self.processor, sets, description=description, **self.options))

    def reference(self, rows_forget: Sequence[Row]) -> dict:
        """The base and edited models' summaries restricted to these forget rows (and the retain sample)."""
        ids = {row.id for row in rows_forget}
        return {name: summarise(r for r in found if r.split != "forget" or r.row in ids)
                for name, found in self.records.items()}


def recoveries(reference: dict, attacked: dict, min_gap: float, split: str = "forget") -> dict:
    """{form: {metric: recovery}} of an attacked edited model against the base and edited models."""
    out: dict = {}
    for form, values in reference["base"].get(split, {}).items():
        for metric, base in values.items():
            edited = reference["edited"].get(split, {}).get(form, {}).get(metric)
            after = attacked.get(split, {}).get(form, {}).get(metric)
            if edited is not None and after is not None:
                out.setdefault(form, {})[metric] = attack_metrics.recovery(base, edited, after, min_gap)
    return out


# ---- relearn -----------------------------------------------------------------------------------------

def _relearn(context: _Context, sets, control) -> dict:
    settings = context.settings
    fit, held = attack_metrics.split_facts(context.scored["forget"], settings.seed)
    evaluated = {row.entity for row in context.scored["retain"]}
    others = [row for row in sets["retain"] if row.entity not in evaluated] or list(sets["retain"])
    benign = random.Random(f"mmedit-attack-retain:{settings.seed}").sample(others, min(len(fit), len(others)))
    reference = context.reference(held)
    out = {"fit_rows": len(fit), "scored_rows": len(held), "retain_only_rows": len(benign),
           "method": "full" if settings.full else f"lora r={settings.rank} on {'+'.join(settings.lora_parts)}",
           "reference": reference, "variants": {}}
    for variant, rows in zip(RELEARN_VARIANTS, (fit, benign)):
        found = {}
        for name in ("base", "edited"):
            with context.copy(edited=name == "edited") as duplicate:
                losses = relearn(duplicate, context.processor, rows, settings, progress=context.progress,
                                 description=f"relearn {variant}: {name} model", log_as=f"relearn/{variant}/{name}")
                found[name] = context.evaluate(duplicate, held, f"evaluating: {name} model after relearn {variant}")
                found[f"{name}_loss"] = {"first": losses[0], "last": losses[-1]}
        out["variants"][variant] = {"attacked": {"base": found["base"], "edited": found["edited"]},
                                    "train_loss": {"base": found["base_loss"], "edited": found["edited_loss"]},
                                    "recovery": recoveries(reference, found["edited"], settings.min_gap)}
    return out


def relearn(model, processor, rows: Sequence[Row], settings: Settings, progress: bool = True,
            description: str = "relearn", log_as: str = "relearn") -> list[float]:
    """Fine-tune `model` in place on `rows` (both forms, loss on the answer tokens: the model's own
    cross-entropy over the labels) for settings.steps AdamW steps: LoRA adapters on the linear layers of
    settings.lora_parts, or every weight with settings.full. Returns the loss of every step; each step's
    loss, lr and gradient norm go to the TensorBoard log as `log_as`/... (mmedit.logs; attack --log-dir)."""
    device = input_device(model)
    batches = [batch for form in FORMS
               for batch in make_batches(rows, processor, form=form, batch_size=settings.train_batch_size,
                                         device=device)
               if form == "text" or all(row.image is not None for row in batch.rows)]
    if not batches:
        raise MmeditError("relearn: no rows to train on")
    order = random.Random(f"mmedit-relearn:{settings.seed}")
    losses = []
    with torch.random.fork_rng(devices=[]):  # LoRA's initialisation, without moving the caller's generator
        torch.manual_seed(settings.seed)
        parameters = list(model.parameters()) if settings.full else _add_lora(model, settings)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
        model.train()
        queue: list = []
        for _ in track(range(settings.steps), description, enabled=progress):
            if not queue:
                queue = order.sample(batches, len(batches))
            loss = model(**queue.pop().inputs).loss
            if not torch.isfinite(loss):
                raise MmeditError(f"{description}: the loss is {loss.item()}; lower the learning rate")
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            logs.scalars({"loss": losses[-1], "lr": settings.lr, "grad_norm": norm.item()}, prefix=log_as)
        model.eval()
    return losses


def _peft():
    try:
        import peft
    except ImportError:
        raise MmeditError("relearn with LoRA needs peft: pip install peft, or mmedit's attack extra (or relearn "
                          "every weight with --full)") from None
    return peft


def _add_lora(model, settings: Settings) -> list[torch.nn.Parameter]:
    """LoRA adapters (PEFT) on every linear layer inside settings.lora_parts; returns their parameters."""
    peft = _peft()
    mapped = model_map(model)
    roots = [root for part in settings.lora_parts for root in mapped.part_modules(part)]
    head = model.get_output_embeddings()
    targets = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and module is not head and any(name.startswith(root + ".") for root in roots)]
    if not targets:
        raise MmeditError(f"relearn: no linear layers in {', '.join(settings.lora_parts)} for LoRA")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0, target_modules=targets)
    peft.inject_adapter_in_model(config, model)
    return [parameter for name, parameter in model.named_parameters() if "lora_" in name]


# ---- quantize ----------------------------------------------------------------------------------------

def _quantize(context: _Context, sets, control) -> dict:
    settings = context.settings
    forget = context.scored["forget"]
    reference = context.reference(forget)
    out = {"method": f"weight-only symmetric round-to-nearest, group size {settings.group_size}, every linear "
                     "layer but the output head", "reference": reference, "variants": {}}
    for bits in settings.bits:
        found, errors = {}, {}
        for name in ("base", "edited"):
            with context.copy(edited=name == "edited") as duplicate:
                errors[name] = quantize(duplicate, bits, settings.group_size)
                found[name] = context.evaluate(duplicate, forget, f"evaluating: {name} model at int{bits}")
        out["variants"][f"int{bits}"] = {"attacked": found, "weights": errors,
                                         "recovery": recoveries(reference, found["edited"], settings.min_gap)}
    return out


def quantizable(model, group_size: int) -> tuple[list[str], list[str]]:
    """(the linear layers, all but the output head, whose inputs split into groups of `group_size`, the
    other linear layers); one error when none does. Works on a meta model: `mmedit attack` asks before the
    weights load."""
    head = model.get_output_embeddings()
    linear = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head]
    done = [name for name, module in linear if module.in_features % group_size == 0]
    if not done:
        raise MmeditError(f"quantize: no linear layer has a multiple of {group_size} inputs; pick another --group-size")
    return done, [name for name, module in linear if module.in_features % group_size]


def quantize(model, bits: int, group_size: int) -> dict:
    """Replace, in place, the weight of every linear layer but the output head by its int`bits` group-wise
    RTN (attack_metrics.rtn). Returns the layers done and skipped (inputs not a multiple of group_size) and
    the relative change of the weights done, ||W - Q|| / ||W|| over all of them."""
    done, skipped = quantizable(model, group_size)
    modules = dict(model.named_modules())
    change, norm = 0.0, 0.0
    with torch.no_grad():
        for name in done:
            module = modules[name]
            quantized = attack_metrics.rtn(module.weight, bits, group_size)
            change += float((module.weight.float() - quantized.float()).pow(2).sum())
            norm += float(module.weight.float().pow(2).sum())
            module.weight.copy_(quantized)
    return {"layers": len(done), "skipped": skipped, "relative_change": (change / norm) ** 0.5 if norm else 0.0}


# ---- probe -------------------------------------------------------------------------------------------

def _probe_training(sets, settings: Settings) -> list[Row]:
    """The retain rows the probe is fitted on: every retain person but the scored (control) sample."""
    retain = sets.get("retain", [])
    return probe.training_rows(retain, select_people(retain, settings.retain_people, settings.seed))


def _probe(context: _Context, sets, control) -> dict:
    settings = context.settings
    groups = {"train": _probe_training(sets, settings), "forget": context.scored["forget"],
              "retain": context.scored["retain"]}
    states = {}
    for name in ("base", "edited"):
        wanted = {group: rows for group, rows in groups.items() if name == "base" or group != "train"}
        with context.deltas.applied(context.model, name == "edited"):
            states[name] = probe.collect(context.model, context.processor, wanted, settings.batch_size,
                                         context.progress, f"probe: {name} model hidden states")
    return {"method": f"multinomial logistic regression per layer on standardised hidden states (last prompt "
                      f"token), L2 {settings.probe_decay}, {settings.probe_steps} L-BFGS iterations; fitted on the "
                      "base model only", "label": "the normalised correct answer (the chosen option for multiple "
                      "choice); only labels two or more training people share are learnt", "chance": "the most frequent training label per image-form question",
            "layer_choice": "best_layer: the highest base accuracy on the held-out retain people (the control), "
                            "not on the forget people; attacker_best_layer: the highest edited forget accuracy",
            "people": {group: sorted({row.entity for row in rows}) for group, rows in groups.items()},
            "forms": probe.score(states, groups, settings.probe_decay, settings.probe_steps, settings.min_gap,
                                 context.progress)}


# ---- mia ---------------------------------------------------------------------------------------------

def _mia(context: _Context, sets, control) -> dict:
    settings = context.settings
    groups = {"forget": _unique(sets["forget"]), "retain": _unique(context.scored["retain"]),
              "control": _unique(_strangers(control, sets))}
    out = {"members": "forget people (and, as a check, the sampled retain people)",
           "control": "people the model never saw (--mia-control), less any person also in the data folder",
           "people": {name: len({row.entity for row in rows}) for name, rows in groups.items()},
           "models": {}}
    for name in ("base", "edited"):
        with context.deltas.applied(context.model, name == "edited"):
            scores, dropped = membership(context.model, context.processor, groups, settings.min_k,
                                         settings.batch_size, context.progress, f"mia: {name} model")
        out["models"][name] = {"auc": {form: {member: {score: attack_metrics.auc(
            [value[score] for value in by_group.get(member, {}).values()],
            [value[score] for value in by_group.get("control", {}).values()]) for score in MIA_SCORES}
            for member in ("forget", "retain")} for form, by_group in scores.items()},
            "scores": scores, "rows_with_unknown_tokens": dropped}
    return out


def membership(model, processor, groups: dict[str, Sequence[Row]], k: float, batch_size: int = 64,
               progress: bool = True, description: str = "mia") -> tuple[dict, dict]:
    """Per form, group and person: {"loss": -(mean answer-token log-probability), "min_k": Min-K% of them}
    turned so that higher is more member-like ("loss" holds minus the loss). Rows whose prompt has a token
    the tokenizer does not know are left out (the model would tell them apart by that token, not by
    membership): ({form: {group: {person: scores}}}, {form: {group: rows left out}})."""
    unknown = processor.tokenizer.unk_token_id
    tokens: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    dropped: dict = defaultdict(lambda: defaultdict(int))
    jobs = [(form, group, [row for row in rows if form == "text" or row.image is not None])
            for form in FORMS for group, rows in groups.items()]
    device = input_device(model)
    batches = ((form, group, batch) for form, group, rows in jobs
               for batch in make_batches(rows, processor, form=form, batch_size=batch_size, device=device))
    total = sum(-(-len(rows) // batch_size) for _, _, rows in jobs)
    with torch.no_grad():
        for form, group, batch in track(batches, description, total=total, enabled=progress):
            inputs = dict(batch.inputs)
            labels = inputs.pop("labels")
            for row, ids, values in zip(batch.rows, inputs["input_ids"], answer_logprobs(model(**inputs).logits, labels)):
                if unknown is not None and bool((ids == unknown).any()):
                    dropped[REPORT_FORMS[form]][group] += 1
                else:
                    tokens[REPORT_FORMS[form]][group][row.entity] += values
    scores = {form: {group: {entity: {"loss": sum(values) / len(values), "min_k": attack_metrics.min_k_mean(values, k)}
                             for entity, values in people.items()} for group, people in by_group.items()}
              for form, by_group in tokens.items()}
    return scores, {form: dict(counts) for form, counts in dropped.items()}


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Per sequence, the log-probability of each labelled (answer) token, in order."""
    target = labels[:, 1:]
    picked = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [row[mask].tolist() for row, mask in zip(picked.cpu(), (target != IGNORE).cpu())]


def _unique(rows: Sequence[Row]) -> list[Row]:
    """One row per (person, question, answer, image): the benchmark asks some questions twice (multiple
    choice and short answer share the wording), which would count them twice."""
    seen, out = set(), []
    for row in rows:
        key = (row.entity, row.question, row.text_question, row.answer, row.image)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _strangers(control: Sequence[Row], sets: dict[str, Sequence[Row]]) -> list[Row]:
    known = {row.entity for rows in sets.values() for row in rows}
    return [row for row in control if row.entity not in known]


# ---- leakage -----------------------------------------------------------------------------------------

def _leakage(context: _Context, sets, control) -> dict:
    forget = [r for r in context.records["base"] if r.split == "forget"]
    edited = [r for r in context.records["edited"] if r.split == "forget"]
    return {"definition": "per question the base model answers right in both forms: forgotten = the edited model "
                          "misses it in the source form; leaked = of those, the edited model still answers it in "
                          "the other form", "forms": list(metrics.FORMS),
            "directions": attack_metrics.leakage(forget, edited, tuple(metrics.FORMS))}


_RUNNERS = {"relearn": _relearn, "quantize": _quantize, "probe": _probe, "mia": _mia, "leakage": _leakage}


# ---- data --------------------------------------------------------------------------------------------

def _describe_sets(scored: dict[str, Sequence[Row]]) -> dict:
    return {split: {"rows": len(rows), "people": sorted({row.entity for row in rows})} for split, rows in scored.items()}
