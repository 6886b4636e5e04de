"""The search space of train.py: its hyperparameter constants, read and rewritten in place.

Constants are the module-level `NAME = literal` lines (UPPER_CASE names) above the first `def` or
`class`, each on one line and assigned nowhere else; literals are ints, floats, strings, bools and
tuples of numbers. Which of them are searched, and over what, is inferred from name and value:

    name                                  value              searched as
    LR, *_LR                              number > 0         float, log scale, current / 4 .. x 4
    DEPTH, *_DEPTH, N_LAYER(S)            int >= 1           int, current - 4 .. + 4, at least 1
    *BATCH_SIZE                           power of two       power of two, current / 4 .. x 4
    *_RATIO, *_FRAC                       float in [0, 1]    float in [0, 1]   (ints such as ASPECT_RATIO: not)
    WEIGHT_DECAY, *_WEIGHT_DECAY          number >= 0        float in [0, max(2 x current, 0.1)]
    *BETAS                                floats in (0, 1)   each a float, current -/+ 0.15 within [0, 0.999]
    WINDOW_PATTERN                        S/L string         one of L, SL, SSL, SSSL (and the current one)
    SEED, *_SEED                          -                  never: a seed is not a hyperparameter
    anything else                         -                  not searched unless the config names it

The `[search]` settings change that: `include` adds constants (ints and positive floats get a
x/4 .. x4 log range, anything else needs bounds), `exclude` removes them, and `space` sets a
constant's range or choices: {"low", "high", "log", "step"} or {"choices": [...]}. A tuple's
elements take the range of `NAME` or of `NAME[i]`. Mistakes raise ValueError.

Batch sizes: train.py needs TOTAL_BATCH_SIZE to be a multiple of DEVICE_BATCH_SIZE * seq_len. Both are
sampled as powers of two and `fit_batch` repairs a sampled pair that breaks the rule by halving
DEVICE_BATCH_SIZE (gradient accumulation takes up the rest); see its docstring.

This module knows nothing of Optuna: a Param suggests its value through any object with Optuna's
`suggest_float`, `suggest_int` and `suggest_categorical`.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
ELEMENT = re.compile(r"^([A-Z][A-Z0-9_]*)\[(\d+)\]$")
WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL")
DEPTH_NAMES = ("DEPTH", "N_LAYER", "N_LAYERS", "NUM_LAYERS")
SIGNIFICANT = 3  # significant digits of a written float: readable diffs, and far finer than the noise
OVERRIDE_KEYS = {"low", "high", "log", "step", "choices"}


# --- reading and writing the constants ----------------------------------------------------------
@dataclass(frozen=True)
class Constant:
    name: str
    value: Any
    source: str  # the literal as written in the file
    line: int  # 1-based
    start: int  # byte offsets of the literal within its line
    end: int


def _literal(node: ast.expr) -> Any:
    """The value of a supported literal, or raise ValueError."""
    value = ast.literal_eval(node)
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
        return value
    raise ValueError("unsupported literal")


def _module_stores(tree: ast.Module) -> dict[str, int]:
    """How often each name is bound at module level (compound statements included, defs not)."""
    counts: dict[str, int] = {}
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            name = getattr(node, "name", None)
            if name:
                counts[name] = counts.get(name, 0) + 1
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            counts[node.id] = counts.get(node.id, 0) + 1
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                counts[bound] = counts.get(bound, 0) + 1
        todo.extend(ast.iter_child_nodes(node))
    return counts


def parse_constants(text: str) -> dict[str, Constant]:
    """The rewritable constants at the top of a script, by name, in file order."""
    tree = ast.parse(text)
    lines = text.split("\n")
    found: dict[str, Constant] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            break  # the top of the file ends at the first definition
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        else:
            continue
        if not isinstance(target, ast.Name) or not UPPER.match(target.id):
            continue
        node = stmt.value
        if node.lineno != node.end_lineno:
            continue
        try:
            value = _literal(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        raw = lines[node.lineno - 1].encode()
        source = raw[node.col_offset:node.end_col_offset].decode()
        found[target.id] = Constant(target.id, value, source, node.lineno, node.col_offset, node.end_col_offset)
    # Bound again elsewhere (a second assignment, `global NAME` in a function): rewriting one line would lie.
    stores = _module_stores(tree)
    rebound = {name for name in found if stores.get(name, 0) != 1}
    rebound |= {name for n in ast.walk(tree) if isinstance(n, ast.Global) for name in n.names}
    return {name: c for name, c in found.items() if name not in rebound}


def _round(value: float) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{SIGNIFICANT}g}")


def format_value(value: Any, like: str = "") -> str:
    """A Python literal for `value`; strings keep the quote style of `like` (the old literal)."""
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return repr(_round(value))
    if isinstance(value, str):
        if like.startswith('"') and '"' not in value and "\\" not in value and value.isprintable():
            return f'"{value}"'
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [format_value(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    raise TypeError(f"cannot write {value!r} as a literal")


def normalise(value: Any) -> Any:
    """The value as it will read back from the file (floats rounded, lists as tuples)."""
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, (list, tuple)):
        return tuple(normalise(v) for v in value)
    return value


def rewrite(text: str, constants: dict[str, Constant], values: dict[str, Any]) -> str:
    """`text` with the literal of each named constant replaced; every other byte stays."""
    lines = text.split("\n")
    for name, value in values.items():
        c = constants[name]
        raw = lines[c.line - 1].encode()
        new = format_value(value, c.source).encode()
        lines[c.line - 1] = (raw[:c.start] + new + raw[c.end:]).decode()
    out = "\n".join(lines)
    check = parse_constants(out)
    for name, value in values.items():  # the rewrite must read back as what was meant
        if name not in check or check[name].value != normalise(value):
            raise RuntimeError(f"rewriting {name} to {value!r} did not read back (a bug in the search proposer)")
    return out


# --- the space ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched constant. kind: float, int, pow2 (ints 2**k; low and high are exponents),
    choice, or tuple (one element Param each, named NAME[i])."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    elements: tuple[Param, ...] = field(default=())

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "pow2":
            return 2 ** trial.suggest_int(f"log2({self.name})", int(self.low), int(self.high))
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        return tuple(e.suggest(trial) for e in self.elements)

    def options(self) -> int | None:
        """How many values it can take, None for a continuum (used to avoid a no-op edit)."""
        if self.kind == "choice":
            return len(self.choices)
        if self.kind == "pow2":
            return int(self.high) - int(self.low) + 1
        if self.kind == "int":
            return (int(self.high) - int(self.low)) // int(self.step or 1) + 1
        if self.kind == "float":
            return 1 if self.low == self.high else None
        sizes = [e.options() for e in self.elements]
        return None if None in sizes else math.prod(sizes)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_seed(name: str) -> bool:
    return name == "SEED" or name.endswith("_SEED")


def _is_pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def default_param(name: str, value: Any) -> Param | None:
    """The inferred search range of a constant, or None when it is left alone by default."""
    if _is_seed(name):
        return None
    if (name == "LR" or name.endswith("_LR")) and _is_number(value) and value > 0:
        return Param(name, "float", value / 4, value * 4, log=True)
    if (name in DEPTH_NAMES or name.endswith("_DEPTH")) and isinstance(value, int) and not isinstance(value, bool) \
            and value >= 1:
        return Param(name, "int", max(1, value - 4), value + 4)
    if name.endswith("BATCH_SIZE") and _is_pow2(value):
        e = value.bit_length() - 1
        return Param(name, "pow2", max(0, e - 2), e + 2)
    if name.endswith(("_RATIO", "_FRAC")) and isinstance(value, float) and 0 <= value <= 1:
        return Param(name, "float", 0.0, 1.0)
    if (name == "WEIGHT_DECAY" or name.endswith("_WEIGHT_DECAY")) and _is_number(value) and value >= 0:
        return Param(name, "float", 0.0, max(2.0 * value, 0.1))
    if name.endswith("BETAS") and isinstance(value, tuple) and all(isinstance(b, float) and 0 < b < 1 for b in value):
        return Param(name, "tuple", elements=tuple(
            Param(f"{name}[{i}]", "float", max(0.0, round(b - 0.15, 6)), min(0.999, round(b + 0.15, 6)))
            for i, b in enumerate(value)))
    if name == "WINDOW_PATTERN" and isinstance(value, str) and value and set(value) <= {"S", "L"}:
        return Param(name, "choice", choices=WINDOW_PATTERNS + (() if value in WINDOW_PATTERNS else (value,)))
    return None


def _fallback_param(name: str, value: Any) -> Param | None:
    """A range for a constant the config names without giving one; None if none can be guessed."""
    if isinstance(value, bool):
        return Param(name, "choice", choices=(False, True))
    if isinstance(value, int) and value > 0:
        return Param(name, "int", max(1, value // 4), value * 4, log=True)
    if isinstance(value, float) and value > 0:
        return Param(name, "float", value / 4, value * 4, log=True)
    if isinstance(value, tuple):
        elements = [_fallback_param(f"{name}[{i}]", v) for i, v in enumerate(value)]
        return None if None in elements else Param(name, "tuple", elements=tuple(elements))
    return None


def _override(param: Param | None, name: str, value: Any, spec: Any, where: str) -> Param:
    """`param` (the default, or None) with the config's range or choices applied."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a table such as {{low = ..., high = ...}} or {{choices = [...]}}, "
                         f"got {spec!r}")
    unknown = set(spec) - OVERRIDE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use low, high, log, step or choices")
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise ValueError(f"{where}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list")
        for c in choices:
            if not isinstance(c, (bool, int, float, str)):
                raise ValueError(f"{where}: choice {c!r} is not a number, string or boolean")
            if isinstance(value, str) != isinstance(c, str):
                raise ValueError(f"{where}: choice {c!r} does not have the type of the current value {value!r}")
        if isinstance(value, tuple):
            raise ValueError(f"{where}: a tuple takes a range per element (low/high), not choices")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"{where}: choices repeat a value")
        return Param(name, "choice", choices=tuple(choices))
    if isinstance(value, tuple):
        base = param or _fallback_param(name, value)
        elements = list(base.elements) if base else [None] * len(value)
        return Param(name, "tuple", elements=tuple(
            _override(e, f"{name}[{i}]", v, spec, where) for i, (e, v) in enumerate(zip(elements, value))))
    if isinstance(value, (str, bool)):
        raise ValueError(f"{where}: {name} = {value!r} is not a number; give choices = [...]")
    if param is None or param.kind == "choice":
        param = _fallback_param(name, value)
        if param is None or param.kind == "choice":
            if "low" not in spec or "high" not in spec:
                raise ValueError(f"{where}: {name} = {value!r} has no default range; give low and high")
            param = Param(name, "int" if isinstance(value, int) else "float")
    for key in ("low", "high", "step"):
        if key in spec and not _is_number(spec[key]):
            raise ValueError(f"{where}: {key} must be a number, got {spec[key]!r}")
    if "log" in spec and not isinstance(spec["log"], bool):
        raise ValueError(f"{where}: log must be true or false, got {spec['log']!r}")
    if param.kind == "pow2":
        if "log" in spec or "step" in spec:
            raise ValueError(f"{where}: {name} is searched over powers of two; give only low and high")
        exps = {}
        for key in ("low", "high"):
            if key in spec:
                if not _is_pow2(spec[key]):
                    raise ValueError(f"{where}: {key} = {spec[key]!r} is not a power of two (1, 2, 4, 8, ...)")
                exps[key] = spec[key].bit_length() - 1
        param = replace(param, **exps)
    else:
        changes = {k: spec[k] for k in ("low", "high", "log", "step") if k in spec}
        if "step" in changes and changes["step"] <= 0:
            raise ValueError(f"{where}: step must be positive")
        param = replace(param, **changes)
        if param.kind == "int":
            for key in ("low", "high", "step"):
                v = getattr(param, key)
                if v is not None and not float(v).is_integer():
                    raise ValueError(f"{where}: {name} is an int, so {key} must be a whole number, got {v!r}")
            param = replace(param, low=int(param.low), high=int(param.high),
                            step=None if param.step is None else int(param.step))
        else:
            param = replace(param, low=float(param.low), high=float(param.high))
        if param.log and param.low <= 0:
            raise ValueError(f"{where}: a log scale needs low > 0, got low = {param.low!r}")
        if param.log and param.step:
            raise ValueError(f"{where}: step and log cannot be combined")
    if param.low > param.high:
        low, high = (2 ** param.low, 2 ** param.high) if param.kind == "pow2" else (param.low, param.high)
        raise ValueError(f"{where}: low ({low!r}) is above high ({high!r})")
    return param


def build_space(constants: dict[str, Any], settings: dict | None = None) -> dict[str, Param]:
    """The searched constants by name, in file order. `constants` maps names to current values."""
    settings = settings or {}
    include = _names(settings.get("include", []), "search.include")
    exclude = _names(settings.get("exclude", []), "search.exclude")
    space = settings.get("space", {})
    if not isinstance(space, dict):
        raise ValueError(f"search.space must be a table of NAME = {{...}}, got {space!r}")
    available = ", ".join(constants) or "none"

    def check(name: str, where: str) -> None:
        if name not in constants:
            raise ValueError(f"{where} names {name}, which is not a `NAME = literal` constant at the top of "
                             f"train.py (these are: {available})")
        if _is_seed(name):
            raise ValueError(f"{where} names {name}: a seed is not a hyperparameter (searching it fits the noise)")

    for name in include:
        check(name, "search.include")
    for name in exclude:
        check(name, "search.exclude")
    both = sorted(set(include) & set(exclude))
    if both:
        raise ValueError(f"search.include and search.exclude both name {', '.join(both)}")
    whole = {}
    elements: dict[str, dict[int, Any]] = {}
    for key, spec in space.items():
        m = ELEMENT.match(str(key))
        if m:
            check(m.group(1), f"search.space.{key}")
            value = constants[m.group(1)]
            if not isinstance(value, tuple) or int(m.group(2)) >= len(value):
                raise ValueError(f"search.space.{key}: {m.group(1)} = {value!r} has no element {m.group(2)}")
            elements.setdefault(m.group(1), {})[int(m.group(2))] = spec
        else:
            check(str(key), f"search.space.{key}")
            whole[key] = spec
    for name in list(whole) + list(elements):
        if name in exclude:
            raise ValueError(f"search.space sets {name}, which search.exclude removes")

    params = {}
    for name, value in constants.items():
        if name in exclude:
            continue
        param = default_param(name, value)
        named = name in include or name in whole or name in elements
        if param is None and not named:
            continue
        if name in whole:
            param = _override(param, name, value, whole[name], f"search.space.{name}")
        elif param is None:
            param = _fallback_param(name, value)
            if param is None:
                raise ValueError(f"search.include names {name} = {value!r}, which has no default range; set it in "
                                 f"search.space ({'choices = [...]' if isinstance(value, str) else 'low, high'})")
        if name in elements:
            if param.kind != "tuple":
                raise ValueError(f"search.space.{name}: choices apply to the whole tuple; set elements by range")
            items = list(param.elements)
            for i, spec in elements[name].items():
                items[i] = _override(items[i], f"{name}[{i}]", value[i], spec, f"search.space.{name}[{i}]")
            param = replace(param, elements=tuple(items))
        params[name] = param
    return params


def _names(value, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of constant names, got {value!r}")
    return list(value)


# --- the batch-size rule ------------------------------------------------------------------------
TOTAL_BATCH, DEVICE_BATCH = "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"


def fit_batch(values: dict[str, Any], current: dict[str, Any], seq_len: int | None) -> dict[str, Any]:
    """`values` (the new values of the changed constants) made to respect train.py's rule
    TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * seq_len) == 0: DEVICE_BATCH_SIZE is halved until the rule
    holds, and if even 1 does not fit (TOTAL not a multiple of seq_len) TOTAL_BATCH_SIZE keeps its
    current value. Without a known seq_len, the current TOTAL / DEVICE ratio (seq_len x the current
    gradient accumulation) stands in for it: safe, but it never lowers the accumulation."""
    if TOTAL_BATCH not in values and DEVICE_BATCH not in values:
        return values
    if not all(isinstance(current.get(n), int) for n in (TOTAL_BATCH, DEVICE_BATCH)):
        return values
    cur_total, cur_device = current[TOTAL_BATCH], current[DEVICE_BATCH]
    unit = seq_len
    if not unit:
        if cur_device <= 0 or cur_total % cur_device:
            return {k: v for k, v in values.items() if k not in (TOTAL_BATCH, DEVICE_BATCH)}
        unit = cur_total // cur_device
    out = dict(values)
    total = out.get(TOTAL_BATCH, cur_total)
    if total % unit:
        out.pop(TOTAL_BATCH, None)
        total = cur_total
    device = out.get(DEVICE_BATCH, cur_device)
    while device > 1 and total % (device * unit):
        device //= 2
    if total % (device * unit):
        return {k: v for k, v in values.items() if k not in (TOTAL_BATCH, DEVICE_BATCH)}
    out[DEVICE_BATCH] = device
    return out
