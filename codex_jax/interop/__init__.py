"""Hugging Face interop: Llama-layout export and import of a run's weights (see docs/interop.md)."""
