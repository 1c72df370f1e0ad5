"""telemetry subsystem."""
