"""`search`: the offline default proposer. Optuna's TPE tunes the constants at the top of train.py.

No network, no API key: each proposal rewrites the values of a few constants in train.py (only
their literals; comments and every other byte stay) and says what changed, e.g.
`MATRIX_LR 0.04 -> 0.0523, DEPTH 8 -> 6`. What is searched, and over what, is read from the
script itself (see `space.py`) and can be overridden by the `[search]` table of the workspace's
config (`SearchSettings`).

How a proposal is made. The lab keeps a change only if it beats the current best by more than the
noise, and resets train.py to the best commit before each proposal. So each proposal starts from
the current best values and changes a few constants (1 to 3 by default, `changes`): every trial
is one readable idea that the keep/discard rule judges against the best, and the search moves
from the incumbent rather than jumping to a point that differs in all 13 constants, which in a
night of ~100 noisy trials mostly lands far from the best. Which constants change is drawn at
random (seeded, reproducible); their new values come from the sampler (TPE, or `random` for
comparison). The Optuna trial records exactly what was evaluated: its params are the changed
constants' values (a value TPE samples for a constant that did not change would describe a point
never measured), its user attrs the full point (`point`), the changes (`edits`) and the ledger
trial. Independent TPE then models each constant from the trials that moved it. `changes = 0`
samples every constant in every trial instead (classic TPE over the whole space).

A proposal never leaves train.py as it was: a sampled value equal to the current one (a
categorical, an int, a rounded float) does not count, and more constants are drawn until the file
changes and, where the space allows, the point differs from every point already tried.

Outcomes. Every trial's outcome is told to the study: keep and discard with the mean val_bpb of
the candidate's runs (the harness's measurement; one run unless the lab re-ran a borderline
candidate), a crash as FAIL (TPE learns only from completed trials).

Resume. The study lives in the workspace (`.autoresearch/search.journal`, Optuna's journal file
storage: one append-only file, no database server, survives kill -9) and is reopened by a new
proposer. An Optuna trial stays RUNNING until its outcome arrives; it remembers its description and
the last ledger trial before it. On the first proposal after a restart each RUNNING trial is
matched with the ledger (`ctx.history`): if the lab recorded its outcome but died before telling,
that outcome is told now; if the outcome never came (the lab died before the trial was recorded,
or the trial was interrupted), the same Optuna trial is proposed again, once (`retries`), and told
FAIL after that, so a point that kills the lab cannot stall the search.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoresearch.lab.outcomes import RUN_AGAIN, Kind, Status
from autoresearch.lab.proposer import Proposer, check_settings

from .space import build_space, fit_batch, normalise, parse_constants, rewrite

if TYPE_CHECKING:
    from autoresearch.lab.ledger import Trial
    from autoresearch.lab.proposer import ProposalContext

STUDY_NAME = "search"
JOURNAL = "search.journal"  # in the workspace's .autoresearch/
LAB_DIR = ".autoresearch"
TRAIN = "train.py"
MAX_ASKS = 5  # Optuna trials to ask for before giving up on finding any change at all
USAGE_KEY = "search_trial"  # in a trial's proposer_usage: the Optuna trial it measured


@dataclass
class SearchSettings:
    """The `[search]` table of the workspace config; every key is optional."""

    seed: int = 0  # seeds the sampler and the choice of constants to change
    sampler: str = "tpe"  # tpe, or random (Optuna's RandomSampler over the same space: a baseline)
    n_startup_trials: int = 5  # TPE: random proposals before the model is used
    changes: tuple[int, int] = (1, 3)  # constants changed per trial, [min, max]; 0 = all (classic TPE)
    include: list[str] = field(default_factory=list)  # constants to search beyond the inferred ones
    exclude: list[str] = field(default_factory=list)  # inferred constants to leave alone
    space: dict = field(default_factory=dict)  # NAME = {low, high, log, step} or {choices}
    retries: int = 1  # times a proposal whose outcome never arrived is proposed again
    seq_len: int | None = None  # for the batch-size rule; default: the workspace profile's

    @classmethod
    def from_dict(cls, raw: dict | None) -> SearchSettings:
        raw = dict(raw or {})
        known = set(cls.__dataclass_fields__)
        check_settings("search", raw, known)
        s = cls(**raw)
        for key in ("seed", "n_startup_trials", "retries"):
            value = getattr(s, key)
            if not isinstance(value, int) or isinstance(value, bool) or (key != "seed" and value < 0):
                raise ValueError(f"search.{key} must be a whole number{'' if key == 'seed' else ' >= 0'}, got {value!r}")
        if s.sampler not in ("tpe", "random"):
            raise ValueError(f"search.sampler must be 'tpe' or 'random', got {s.sampler!r}")
        changes = s.changes
        if isinstance(changes, int) and not isinstance(changes, bool):
            changes = (changes, changes)
        ok = (isinstance(changes, (list, tuple)) and len(changes) == 2
              and all(isinstance(c, int) and not isinstance(c, bool) for c in changes)
              and (tuple(changes) == (0, 0) or 1 <= changes[0] <= changes[1]))
        if not ok:
            raise ValueError(f"search.changes must be a count or [min, max] with 1 <= min <= max (or 0: every "
                             f"constant in every trial), got {s.changes!r}")
        s.changes = (int(changes[0]), int(changes[1]))
        if s.seq_len is not None and (not isinstance(s.seq_len, int) or s.seq_len < 1):
            raise ValueError(f"search.seq_len must be a positive whole number, got {s.seq_len!r}")
        return s


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class SearchProposer(Proposer):
    name = "search"

    def __init__(self, workspace: Path, settings: dict | SearchSettings | None = None):
        self.workspace = Path(workspace)
        self.settings = settings if isinstance(settings, SearchSettings) else SearchSettings.from_dict(settings)
        constants = parse_constants((self.workspace / TRAIN).read_text())
        current = {name: c.value for name, c in constants.items()}
        build_space(current, self._space_settings())  # a bad [search] table fails here, before any file is made

        try:
            import optuna  # here, not at the top: `autoresearch --help` should not pay for it
        except ModuleNotFoundError:
            raise RuntimeError("the search proposer needs Optuna: pip install 'optuna>=4.0'") from None

        self._optuna = optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        (self.workspace / LAB_DIR).mkdir(parents=True, exist_ok=True)
        self.storage = JournalStorage(JournalFileBackend(str(self.workspace / LAB_DIR / JOURNAL)))
        self.study = optuna.create_study(storage=self.storage, study_name=STUDY_NAME, direction="minimize",
                                         load_if_exists=True)
        # The space is centred on the constants as they were when the study began, so its ranges stay
        # the same across restarts even after kept changes have moved train.py.
        centre = self.study.user_attrs.get("centre")
        if centre is None:
            centre = {name: _jsonable(v) for name, v in current.items()}
            self.study.set_user_attr("centre", centre)
            self.study.set_user_attr("settings", {k: _jsonable(v) for k, v in vars(self.settings).items()})
        self.centre = {name: tuple(v) if isinstance(v, list) else v for name, v in centre.items()}
        self.space = build_space({n: self.centre.get(n, v) for n, v in current.items()}, self._space_settings())
        self._study_id = self.storage.get_study_id_from_name(STUDY_NAME)
        n_before = len(self.study.get_trials(deepcopy=False))
        sampler_seed = self.settings.seed * 1_000_003 + n_before  # a restart does not replay the same draws
        if self.settings.sampler == "random":
            self.study.sampler = optuna.samplers.RandomSampler(seed=sampler_seed)
        else:
            # constant_liar: a trial still running counts as a bad result, so that proposals made
            # while others are measured (several trial slots) spread out instead of piling up.
            self.study.sampler = optuna.samplers.TPESampler(
                seed=sampler_seed, n_startup_trials=self.settings.n_startup_trials,
                multivariate=self.settings.changes == (0, 0), constant_liar=True)
        self._pending: int | None = None  # the Optuna trial the proposal under way has written
        self._retry: list[int] = []
        self._reconciled = False
        self.last_usage = {}

    @classmethod
    def from_settings(cls, workspace: Path, settings: dict | None = None) -> SearchProposer:
        """The proposer for `workspace`, configured by its `[search]` table (a dict; may be empty)."""
        return cls(workspace, settings)

    def _space_settings(self) -> dict:
        s = self.settings
        return {"include": s.include, "exclude": s.exclude, "space": s.space}

    # --- the interface --------------------------------------------------------------------------
    def propose(self, ctx: ProposalContext) -> str | None:
        started = time.perf_counter()
        if not self._reconciled:
            self._reconcile(ctx)
            self._reconciled = True
        self.last_usage = {}
        self._pending = None
        description = None
        after = max((t.id for t in ctx.history), default=0)
        train = Path(ctx.workspace) / TRAIN
        while self._retry and description is None:
            description = self._propose_again(train, self._retry.pop(0), after)
        if description is None:
            description = self._propose_new(train, after, self._seq_len(ctx))
        self.last_usage = {"seconds": round(time.perf_counter() - started, 4)}
        if self._pending is not None:  # the lab records it with the trial, and tell() reads it back
            self.last_usage[USAGE_KEY] = self._pending
        return description

    def tell(self, trial: Trial) -> None:
        number = (trial.proposer_usage or {}).get(USAGE_KEY)
        if not isinstance(number, int) or self._state(number) != "RUNNING":
            return
        if trial.status in RUN_AGAIN:
            self._note(number, trial)  # the lab is stopping: it runs this again when it goes on
            return
        self._finish(number, trial)

    # --- telling --------------------------------------------------------------------------------
    def _state(self, number: int) -> str:
        return self.study.get_trials(deepcopy=False)[number].state.name

    def _note(self, number: int, trial: Trial) -> None:
        ids = self._attrs(number).get("ledger_ids", [])
        self.storage.set_trial_user_attr(self._id(number), "ledger_ids", [*ids, trial.id])

    def _finish(self, number: int, trial: Trial) -> None:
        self._note(number, trial)
        tid = self._id(number)
        self.storage.set_trial_user_attr(tid, "ledger_status", trial.status)
        if trial.reason:
            self.storage.set_trial_user_attr(tid, "ledger_reason", trial.reason[:300])
        values = trial.values
        if trial.status in (Status.KEEP, Status.DISCARD) and values:
            self.study.tell(number, statistics.fmean(values), skip_if_finished=True)
        else:
            self.study.tell(number, state=self._optuna.trial.TrialState.FAIL, skip_if_finished=True)

    def _fail(self, number: int, why: str) -> None:
        self.storage.set_trial_user_attr(self._id(number), "ledger_reason", why)
        self.study.tell(number, state=self._optuna.trial.TrialState.FAIL, skip_if_finished=True)

    def _id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

    def _attrs(self, number: int) -> dict:
        return self.study.get_trials(deepcopy=False)[number].user_attrs

    def _reconcile(self, ctx: ProposalContext) -> None:
        """Settle the Optuna trials left RUNNING by an earlier process (see the module docstring)."""
        trials = self.study.get_trials(deepcopy=False)
        claimed = {i for t in trials for i in t.user_attrs.get("ledger_ids", [])}
        for ot in trials:
            if ot.state.name != "RUNNING" or ot.number == self._pending:
                continue
            attrs = ot.user_attrs
            if "description" not in attrs:
                self._fail(ot.number, "the proposer stopped before it finished this proposal")
                continue
            match = next((t for t in ctx.history if t.kind == Kind.CANDIDATE and t.proposer == self.name
                          and t.id > attrs.get("after", -1) and t.id not in claimed and t.status not in RUN_AGAIN
                          and t.description == attrs["description"]), None)
            if match is not None:
                claimed.add(match.id)
                if match.status != Status.RUNNING:
                    self._finish(ot.number, match)  # the lab recorded it but died before telling
                    continue
                self._note(ot.number, match)
            self._retry.append(ot.number)

    # --- proposing ------------------------------------------------------------------------------
    def _seq_len(self, ctx: ProposalContext) -> int | None:
        return self.settings.seq_len or ctx.seq_len

    @staticmethod
    def _current(train: Path):
        text = train.read_text()
        constants = parse_constants(text)
        return text, constants, {name: c.value for name, c in constants.items()}

    def _write(self, train: Path, number: int, text: str, constants, edits: dict[str, Any], after: int,
               attempts: int) -> str | None:
        """Write the edit, record it on the Optuna trial; returns the description (None: no change)."""
        edits = {n: v for n, v in edits.items() if normalise(v) != constants[n].value}
        if not edits:
            return None
        new_text = rewrite(text, constants, edits)
        written = parse_constants(new_text)
        description = ", ".join(f"{n} {constants[n].source} -> {written[n].source}" for n in edits)
        point = {n: _jsonable(written[n].value) for n in self.space if n in written}
        tid = self._id(number)
        for key, value in (("description", description), ("after", after), ("attempts", attempts),
                           ("edits", {n: _jsonable(written[n].value) for n in edits}), ("point", point)):
            self.storage.set_trial_user_attr(tid, key, value)
        train.write_text(new_text)
        self._pending = number
        return description

    def _propose_again(self, train: Path, number: int, after: int) -> str | None:
        attrs = self._attrs(number)
        attempts = attrs.get("attempts", 1)
        if attempts > self.settings.retries:
            self._fail(number, f"no outcome after {attempts} attempt(s) (the lab stopped during it)")
            return None
        text, constants, _ = self._current(train)
        edits = {n: tuple(v) if isinstance(v, list) else v for n, v in attrs.get("edits", {}).items()
                 if n in constants}
        description = self._write(train, number, text, constants, edits, after, attempts + 1)
        if description is None:
            self._fail(number, "proposed again, its edit no longer changed train.py")
        return description

    def _propose_new(self, train: Path, after: int, seq_len: int | None) -> str | None:
        text, constants, current = self._current(train)
        names = [n for n in self.space if n in constants]
        movable = [n for n in names if self.space[n].options() != 1]
        if not movable:
            return None
        tried = {self._key(t.user_attrs.get("point", {})) for t in self.study.get_trials(deepcopy=False)}
        for _ in range(MAX_ASKS):
            trial = self.study.ask()
            self._pending = trial.number
            rng = random.Random(self.settings.seed * 1_000_003 + trial.number)
            order = rng.sample(movable, len(movable))
            lo, hi = self.settings.changes
            want = len(order) if hi == 0 else min(len(order), rng.randint(lo, hi))
            sampled: dict[str, Any] = {}
            edits: dict[str, Any] = {}
            for name in order:
                sampled[name] = self.space[name].suggest(trial)
                edits = fit_batch({n: v for n, v in sampled.items() if normalise(v) != current[n]}, current, seq_len)
                edits = {n: v for n, v in edits.items() if normalise(v) != current[n]}
                if len(sampled) >= want and edits and self._key({**current, **edits}) not in tried:
                    break
            description = self._write(train, trial.number, text, constants, edits, after, 1)
            if description is not None:
                self.storage.set_trial_user_attr(self._id(trial.number), "sampled",
                                                 {n: _jsonable(v) for n, v in sampled.items()})
                adjusted = sorted(n for n in edits if n not in sampled or sampled[n] != edits[n])
                if adjusted:  # by the batch rule: these values are not the sampled ones
                    self.storage.set_trial_user_attr(self._id(trial.number), "adjusted", adjusted)
                return description
            self._fail(trial.number, "no value differed from train.py's")
            self._pending = None
        return None

    def _key(self, point: dict) -> tuple:
        return tuple(repr(normalise(point.get(n))) for n in sorted(self.space))
