"""Finding an editor's settings for a model: where its facts are (causal tracing, trace.py)."""
