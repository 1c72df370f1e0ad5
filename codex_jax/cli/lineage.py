"""`codex lineage verify WORKDIR|CKPT`, `codex lineage prove CKPT --tensor PATH`, `codex lineage verify --proof FILE`."""

from __future__ import annotations

import json

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)

USAGE = ("codex lineage verify WORKDIR|CKPT | codex lineage verify --proof=FILE --root=HEX | "
         "codex lineage prove CKPT --tensor=PATH [--out=FILE]")
flags.DEFINE_string("proof", None, "verify: a proof file written by `codex lineage prove`.")
flags.DEFINE_string("root", None, "verify --proof: the trusted root (the checkpoint's content_root or optimizer_root).")
flags.DEFINE_bool("untrusted_root_ok", False, "verify --proof without --root: accept a check of the proof's internal "
                  "consistency alone (exit 0); it proves nothing about any checkpoint.")
flags.DEFINE_string("tensor", None, "prove: the tensor's path, e.g. params/layers/attention/q.")
flags.DEFINE_string("out", None, "prove: where to write the proof (default: stdout).")


def run(flag_values, args: list[str]):
  from codex_jax.checkpoint import proof as proof_lib
  from codex_jax.checkpoint import verify
  if args[:1] == ["verify"] and flag_values.proof and len(args) == 1:
    with open(flag_values.proof) as f:
      result = proof_lib.verify_proof(json.load(f), flag_values.root, untrusted_root_ok=flag_values.untrusted_root_ok)
    _say(flag_values, f"proof ok: {result['tensor']} is in {result['root_name']} {result['root']}" if result["trusted_root"]
         else f"proof consistent (internally only, no trusted root): {result['tensor']} in {result['root']}")
    return result
  if args[:1] == ["verify"] and len(args) == 2:
    result = verify.verify(args[1])
    for c in result["checkpoints"]:
      what = f"step {c['step']}" + (f" (average of {len(c['parents'])})" if "parents" in c else "")
      _say(flag_values, f"{what}: ok (content {c['content_root'][:16]}..., lineage {c['lineage_hash'][:16]}...)")
    _say(flag_values, f"lineage ok: {result['chain_length']} record(s) back to the start, "
                      f"{len(result['checkpoints'])} checkpoint(s) re-hashed")
    return result
  if args[:1] == ["prove"] and len(args) == 2 and flag_values.tensor:
    proof = proof_lib.prove(args[1], flag_values.tensor)
    if flag_values.out:
      with open(flag_values.out, "w") as f:
        json.dump(proof, f, indent=2)
      _say(flag_values, f"wrote the proof of {proof['tensor']} ({proof['root_name']} {proof['root']}) to "
                        f"{flag_values.out}")
    elif not flag_values.json:
      print(json.dumps(proof, indent=2))
    return proof
  raise flags.ValidationError(f"expected `{USAGE}`, got `codex lineage {' '.join(args)}`")


def _say(flag_values, text: str) -> None:
  if not flag_values.json:
    print(text)
