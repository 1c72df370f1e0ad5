"""config subsystem."""
