"""The one error type for bad input, and the checks that raise it.

A `ConfigError` carries a one-line message that names the problem and the fix. It is raised before any
expensive work starts; orchestration layers must not retry it.
"""

import math


class ConfigError(ValueError):
    """Bad input or configuration: the message names the problem and how to fix it."""


def flag(name: str) -> str:
    """The command-line flag for a config field: `vocab_size` -> `--vocab-size`."""
    return "--" + name.replace("_", "-")


def require_positive(name: str, value: float | int) -> None:
    """Raise ConfigError unless `value` is a finite number greater than zero."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{name} must be a positive finite number, got {value!r}: pass {flag(name)} with a value > 0"
        )


def require_non_negative(name: str, value: float | int) -> None:
    """Raise ConfigError unless `value` is a finite number at least zero."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(
            f"{name} must be a finite number >= 0, got {value!r}: pass {flag(name)} with a value >= 0"
        )


def require_fraction(name: str, value: float) -> None:
    """Raise ConfigError unless 0 < value < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1):
        raise ConfigError(
            f"{name} must be strictly between 0 and 1, got {value!r}: pass {flag(name)} with 0 < value < 1"
        )


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: pass {flag(name)} as one of {', '.join(choices)}")
