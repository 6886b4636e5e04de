"""Search/replace edits: the format an LLM answers in, how it is parsed, and how it is applied.

A reply holds one line of description and one or more blocks; a line naming the file may stand
just before a block (without one, the block is for train.py):

    DESCRIPTION: halve the batch size

    train.py
    <<<<<<< SEARCH
    TOTAL_BATCH_SIZE = 2**19
    =======
    TOTAL_BATCH_SIZE = 2**18
    >>>>>>> REPLACE

Parsing is forgiving where a model's habits are harmless (code fences around blocks, 5 to 9 marker
characters, trailing spaces, a bold or lower-case DESCRIPTION) and strict where a guess could
change the wrong code: a SEARCH text must match the file exactly once, ignoring only trailing
whitespace. Edits apply all or nothing, and every failure is an `EditError` whose message is
written for the model to read and correct in its next reply.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

TARGET = "train.py"

_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$", re.IGNORECASE)
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(```|~~~)")
DESCRIPTION_LINE = re.compile(r"^[\s*_#>`-]*description\s*[*_]*\s*:\s*[*_]*\s*(?P<text>.*?)[\s*_`]*$", re.IGNORECASE)
_FILE_LINE = re.compile(r"^[\s#*>`]*(?:file(?:name)?\s*:\s*)?[`*]*(?P<path>[\w./\\-]+\.\w+)[`*:]*\s*$", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\s*(?::[^=]+)?=\s*(?P<value>.+?)\s*(?:#.*)?$")
_DEFINITION = re.compile(r"^\s*(?:def|class)\s+(?P<name>\w+)")

FORMAT_HELP = """\
Answer with one line `DESCRIPTION: <what you changed, in one line>` and then one or more edit
blocks for train.py, each in exactly this form:

train.py
<<<<<<< SEARCH
<lines copied exactly from the current train.py, with enough context to match only one place>
=======
<the lines that replace them>
>>>>>>> REPLACE

Rules: the SEARCH part must match train.py exactly once (whitespace included); keep each block
small (a few lines around the change); to delete lines, leave the REPLACE part empty; only
train.py can be edited, blocks for other files are ignored."""


class EditError(ValueError):
    """A reply that cannot be applied; the message tells the model what to fix."""


@dataclass
class Block:
    path: str
    search: str
    replace: str
    line: int  # where the block starts in the reply, 1-based


@dataclass
class Reply:
    description: str | None
    blocks: list[Block] = field(default_factory=list)


def parse_reply(text: str) -> Reply:
    """The description line and the SEARCH/REPLACE blocks of a reply; EditError if malformed."""
    lines = text.splitlines()
    blocks: list[Block] = []
    description = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SEARCH.match(line):
            start = i
            path = _file_before(lines, i)
            search, i = _collect(lines, i + 1, _DIVIDER, start, "the `=======` line after SEARCH")
            replace, i = _collect(lines, i + 1, _REPLACE, start, "the `>>>>>>> REPLACE` line")
            blocks.append(Block(path, search, replace, start + 1))
        elif _DIVIDER.match(line) or _REPLACE.match(line):
            raise EditError(f"line {i + 1} of your reply (`{line.strip()}`) is outside any block: every block must "
                            "start with a `<<<<<<< SEARCH` line")
        else:
            match = DESCRIPTION_LINE.match(line)
            if match and match.group("text").strip():
                description = match.group("text").strip()
        i += 1
    if not blocks:
        raise EditError("your reply has no edit block: edits must be written as `<<<<<<< SEARCH` ... `=======` ... "
                        "`>>>>>>> REPLACE` blocks")
    return Reply(description, blocks)


def _collect(lines: list[str], i: int, end: re.Pattern, start: int, what: str) -> tuple[str, int]:
    body = []
    while i < len(lines):
        if end.match(lines[i]):
            return "".join(f"{line}\n" for line in body), i
        if _SEARCH.match(lines[i]) or (end is _DIVIDER and _REPLACE.match(lines[i])):
            break
        body.append(lines[i])
        i += 1
    raise EditError(f"the block starting at line {start + 1} of your reply has no {what} (was the reply cut off?)")


def _file_before(lines: list[str], i: int) -> str:
    """The file named on the last non-blank, non-fence line before a block; train.py if none."""
    j = i - 1
    while j >= 0 and (not lines[j].strip() or _FENCE.match(lines[j])):
        j -= 1
    if j >= 0:
        match = _FILE_LINE.match(lines[j])
        if match:
            return match.group("path").replace("\\", "/").removeprefix("./")
    return TARGET


@dataclass
class Applied:
    text: str  # the new content of train.py
    description: str  # the reply's, or one derived from the change
    ignored: list[str]  # files other than train.py that the reply tried to edit


def apply_reply(reply_text: str, original: str) -> Applied:
    """train.py's new content after the reply's edits (nothing is written); EditError if they fail."""
    reply = parse_reply(reply_text)
    ours = [b for b in reply.blocks if b.path == TARGET]
    ignored = sorted({b.path for b in reply.blocks if b.path != TARGET})
    if not ours:
        raise EditError(f"your reply only edits {', '.join(ignored)}; only {TARGET} may be edited")
    text = original
    for number, block in enumerate(ours, 1):
        text = apply_block(text, block, number)
    if text == original:
        raise EditError(f"your edits leave {TARGET} exactly as it was; change something")
    try:
        compile(text, TARGET, "exec")
    except SyntaxError as e:
        shown = (e.text or "").rstrip()
        raise EditError(f"after your edits {TARGET} has a syntax error at line {e.lineno}: {e.msg}"
                        + (f" (`{shown.strip()}`)" if shown else "")) from None
    description = " ".join((reply.description or "").split()) or describe_change(original, text)
    return Applied(text, description, ignored)


def apply_block(text: str, block: Block, number: int = 1) -> str:
    """One block applied to `text`; the SEARCH part must match once, up to trailing whitespace."""
    label = f"block {number} (line {block.line} of your reply)"
    if not block.search.strip():
        raise EditError(f"{label} has an empty SEARCH part; copy the lines to replace from {TARGET}")
    count = text.count(block.search)
    if count == 1:
        return text.replace(block.search, block.replace, 1)
    if count > 1:
        raise EditError(f"{label}: its SEARCH text occurs {count} times in {TARGET}; include more surrounding "
                        "lines so it matches one place only")
    # Exactly, but for trailing whitespace and a missing final newline: compare line by line.
    lines = text.splitlines(keepends=True)
    wanted = [line.rstrip() for line in block.search.splitlines()]
    while wanted and not wanted[-1]:
        wanted.pop()
    stripped = [line.rstrip() for line in lines]
    starts = [i for i in range(len(lines) - len(wanted) + 1) if stripped[i:i + len(wanted)] == wanted]
    if len(starts) == 1:
        i = starts[0]
        replacement = block.replace
        if replacement and not replacement.endswith("\n"):
            replacement += "\n"
        return "".join(lines[:i]) + replacement + "".join(lines[i + len(wanted):])
    if len(starts) > 1:
        raise EditError(f"{label}: its SEARCH text matches {len(starts)} places in {TARGET}; include more "
                        "surrounding lines so it matches one place only")
    raise EditError(f"{label}: its SEARCH text is not in {TARGET}. SEARCH must copy existing lines exactly."
                    + _closest(lines, wanted))


def _closest(lines: list[str], wanted: list[str]) -> str:
    """A hint: the lines of the file most like the SEARCH text, if any are close."""
    if not wanted or not lines:
        return ""
    n = min(len(wanted), len(lines))
    target = "\n".join(wanted)
    best, best_ratio = 0, 0.0
    for i in range(len(lines) - n + 1):
        matcher = difflib.SequenceMatcher(None, target, "".join(lines[i:i + n]).rstrip("\n"), autojunk=False)
        if matcher.real_quick_ratio() <= best_ratio or matcher.quick_ratio() <= best_ratio:
            continue
        ratio = matcher.ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    if best_ratio < 0.6:
        return ""
    shown = "".join(lines[best:best + n]).rstrip("\n")
    return f" The most similar lines in {TARGET} (from line {best + 1}) are:\n{shown}"


def describe_change(old: str, new: str, limit: int = 160) -> str:
    """A one-line description derived from a change, for when the proposer gave none.

    Changed module-level constants read as `LR 0.003 -> 0.03`; anything else as the lines added and
    removed and the function or class nearest above where the change begins.
    """
    old_lines, new_lines = old.splitlines(), new.splitlines()
    removed, added, first = [], [], None
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        first = i1 if first is None else first
        removed += [line for line in old_lines[i1:i2] if line.strip()]
        added += [line for line in new_lines[j1:j2] if line.strip()]
    if first is None:
        return "no change"
    before = {m.group("name"): m.group("value") for m in map(_ASSIGNMENT.match, removed) if m}
    after = {m.group("name"): m.group("value") for m in map(_ASSIGNMENT.match, added) if m}
    if len(removed) == len(added) == len(before) == len(after) and before.keys() == after.keys():
        text = ", ".join(f"{name} {before[name]} -> {after[name]}" for name in before)
    else:
        where = next((m.group("name") for m in map(_DEFINITION.match, reversed(old_lines[:first + 1])) if m), None)
        text = f"edit {TARGET}: +{len(added)} -{len(removed)} lines" + (f" near {where}" if where else " at the top")
    return text if len(text) <= limit else text[:limit - 3] + "..."
