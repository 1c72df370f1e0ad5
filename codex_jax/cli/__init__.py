"""cli subsystem."""
