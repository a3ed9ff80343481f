"""The trainer's own error: a run that cannot start, go on, or resume as asked."""


class TrainingError(ValueError):
    """Training cannot start or go on (non-finite values, an output folder clash, a damaged
    checkpoint...)."""
