"""The experiment runner: ``run(cfg) -> summary``."""
