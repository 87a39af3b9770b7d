"""Edit datasets: one module each (its loader); the types of its settings in datasets/schema.py,
its values in conf/dataset/NAME.yaml."""
