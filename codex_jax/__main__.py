"""`python -m codex_jax` is the `codex` command."""

from codex_jax.cli.main import run

if __name__ == "__main__":
  run()
