"""The train.py template, with a profile's values written over its constants."""
from __future__ import annotations

import json
import re
from importlib import resources

from .profiles import Profile


def template_source() -> str:
    return resources.files("autoresearch").joinpath("templates", "train.py").read_text()


def render_trainer(profile: Profile, source: str | None = None) -> str:
    """train.py for `profile`: each `NAME = value` line named in profile.trainer gets the profile's
    value; the line's trailing comment stays."""
    text = template_source() if source is None else source
    for name, value in profile.trainer.items():
        pattern = re.compile(rf"^{re.escape(name)}\s*=\s*[^#\n]*?(\s*#.*)?$", re.MULTILINE)
        literal = json.dumps(value) if isinstance(value, str) else repr(value)  # "L", as the template writes it
        text, count = pattern.subn(lambda m: f"{name} = {literal}{m.group(1) or ''}", text, count=1)
        if count != 1:
            raise ValueError(f"profile {profile.name!r} sets {name}, but train.py has no `{name} = ...` line")
    return text
