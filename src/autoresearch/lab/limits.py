"""The wall-clock limits the lab puts on one trial: plain arithmetic, so that readers of a workspace
(the report, the dashboard) can know them without importing the lab's heavier modules."""


def trainer_limit(time_budget: float, grace_seconds: float | None = None) -> float:
    """Seconds after which the trainer's whole process group is killed."""
    # Start-up, compilation (a minute or more, cold) and evaluation: 10 minutes at 300 s, as the reference.
    return time_budget + (max(time_budget, 300.0) if grace_seconds is None else float(grace_seconds))


def evaluation_limit(trainer_seconds: float) -> float:
    """Seconds allowed to the separate process that scores the checkpoint."""
    return max(600.0, trainer_seconds)
