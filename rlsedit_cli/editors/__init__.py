"""Editors: one module (its config dataclass and class) and one conf/editor YAML each."""
