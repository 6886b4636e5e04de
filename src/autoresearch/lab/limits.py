"""The wall-clock limits the lab puts on one trial: plain arithmetic on a workspace's config, so that
readers of a workspace (the report, the dashboard) can know them without importing the lab's
heavier modules."""

STARTUP_LIMIT = {"cpu": 120.0}  # seconds to training_started(), by profile; others: DEFAULT_STARTUP_LIMIT
DEFAULT_STARTUP_LIMIT = 300.0  # imports, model build, a cold compile (a minute or more) and warm-up
SCORING_LIMIT = 600.0  # seconds to rebuild and score the model, from the hand-in
MARGIN = 60.0  # the supervisor's own start-up and bookkeeping


def startup_limit(config: dict) -> float:
    value = config.get("startup_limit")
    return float(value) if value is not None else STARTUP_LIMIT.get(config.get("profile", ""), DEFAULT_STARTUP_LIMIT)


def trial_limit(config: dict, time_budget: float) -> float:
    """Seconds after which a trial is over whatever happened: every phase's limit, one after another."""
    tolerance = float(config.get("training_tolerance", 0.05))
    return (startup_limit(config) + time_budget * (1 + tolerance) + 0.5 + float(config.get("scoring_limit", SCORING_LIMIT))
            + MARGIN)
