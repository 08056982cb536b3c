"""The configuration's building blocks, shared by every section: the error type and the section base class.

A leaf module (it imports nothing of fishds), so that every table (fishds/fish/, fishds/run/formats.py,
fishds/methods.py) can raise `ConfigError` and every section (fishds/config.py, fishds/fish/config.py) can build on
`Section` without an import circle. `fishds.config.ConfigError` is the same class.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, reported before any heavy work starts."""


class Section(BaseModel):
    """A config section: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
