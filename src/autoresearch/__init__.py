"""autoresearch: overnight ML research with a frozen harness, one editable trainer and a lab."""

__version__ = "0.1.0"
