"""Editors: one module each (its class, behind editors/base.py's interface); the types of its
settings in editors/schema.py (imported to compose a config: no torch there), its values in
conf/editor/NAME.yaml and its per-model values in conf/editor_model/NAME_MODEL.yaml."""
