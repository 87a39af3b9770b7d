"""Experiment trackers (conf/logger): W&B or none. The run folder is written regardless."""
