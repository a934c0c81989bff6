"""obsdiff."""
