"""azdistill: distil a large teacher LLM into a small student, locally and on Azure ML."""

__version__ = "0.1.0"
