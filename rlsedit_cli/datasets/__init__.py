"""Edit datasets: one module (its config dataclass and loader) and one conf/dataset YAML each."""
