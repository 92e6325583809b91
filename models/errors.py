"""The exceptions the models' entry points report as usage / data errors (exit 2 and one line on stderr,
contracts/cli.py): ``linewatch-models`` (models/cli.py) and ``python -m models.jobs.train_job``."""

from __future__ import annotations


def usage_errors() -> tuple[type[BaseException], ...]:
    from contracts.artifact import ArtifactError
    from models.backbones import BackboneError
    from models.data import DataError

    return DataError, BackboneError, ArtifactError  # an artifact that fails verification is bad data
