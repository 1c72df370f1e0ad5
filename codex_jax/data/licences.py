"""Licence policy: which SPDX licences a run may train on, and why each excluded source was left out."""

from __future__ import annotations

import dataclasses

from codex_jax.data.errors import DataError
from codex_jax.data.manifest import Manifest, Source

# Licence classes, from least to most restrictive for a model trained on the data.
PERMISSIVE, COPYLEFT, RESEARCH = "permissive", "copyleft", "research-only"
# A policy admits its own class and every class before it.
POLICIES = (PERMISSIVE, COPYLEFT, RESEARCH)

CLASSES: dict[str, str] = {
    **{spdx: PERMISSIVE for spdx in (
        "MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "PSF-2.0", "Python-2.0", "ISC", "Zlib",
        "Unlicense", "CC0-1.0", "CC-BY-3.0", "CC-BY-4.0", "PDDL-1.0", "ODC-By-1.0", "BSL-1.0", "0BSD",
        "Unicode-3.0", "Unicode-DFS-2016", "OFL-1.1")},
    **{spdx: COPYLEFT for spdx in (
        "LGPL-2.1-only", "LGPL-2.1-or-later", "LGPL-3.0-only", "LGPL-3.0-or-later", "GPL-2.0-only",
        "GPL-2.0-or-later", "GPL-3.0-only", "GPL-3.0-or-later", "AGPL-3.0-only", "AGPL-3.0-or-later",
        "MPL-2.0", "EPL-2.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "ODbL-1.0", "GFDL-1.3-only", "GFDL-1.3-or-later")},
    **{spdx: RESEARCH for spdx in (
        "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0", "CC-BY-NC-ND-4.0", "CC-BY-NC-3.0", "CC-BY-NC-SA-3.0",
        "LicenseRef-research-only")},
}


@dataclasses.dataclass(frozen=True)
class LicencePolicy:
  allowed_class: str = PERMISSIVE  # permissive | copyleft | research-only.
  allow: tuple[str, ...] = ()  # SPDX ids admitted whatever their class (also ids the table lacks).
  deny: tuple[str, ...] = ()  # SPDX ids refused whatever their class.

  def __post_init__(self):
    if self.allowed_class not in POLICIES:
      raise DataError(f"data.licence_policy {self.allowed_class!r} is not one of {', '.join(POLICIES)}.")


@dataclasses.dataclass(frozen=True)
class Exclusion:
  source: str
  licence: str
  reason: str


def licence_class(spdx: str) -> str | None:
  return CLASSES.get(spdx)


def decide(source: Source, policy: LicencePolicy) -> str | None:
  """None when `source` may be used under `policy`, else the reason it may not."""
  spdx = source.licence
  if spdx in policy.deny:
    return f"licence {spdx} is listed in data.licence_deny"
  if spdx in policy.allow:
    return None
  cls = licence_class(spdx)
  if cls is None:
    raise DataError(f"source {source.name!r}: licence {spdx!r} is not a known SPDX id; use a standard id "
                    f"(e.g. {', '.join(list(CLASSES)[:4])}) or add it to data.licence_allow / data.licence_deny.")
  if POLICIES.index(cls) > POLICIES.index(policy.allowed_class):
    return f"licence {spdx} is {cls}; data.licence_policy={policy.allowed_class!r} admits {_admitted(policy)} only"
  return None


def _admitted(policy: LicencePolicy) -> str:
  return " and ".join(POLICIES[:POLICIES.index(policy.allowed_class) + 1])


def apply_policy(manifest: Manifest, policy: LicencePolicy) -> tuple[tuple[Source, ...], tuple[Exclusion, ...]]:
  """The sources a run may use and the excluded ones with their reasons; fails if nothing is left."""
  included, excluded = [], []
  for source in manifest.sources:
    reason = decide(source, policy)
    if reason is None:
      included.append(source)
    else:
      excluded.append(Exclusion(source.name, source.licence, reason))
  if not included:
    raise DataError(f"{manifest.path}: the licence policy excludes every source "
                    f"({'; '.join(f'{e.source}: {e.reason}' for e in excluded)}).")
  return tuple(included), tuple(excluded)


def effective_shares(sources: tuple[Source, ...], phase: str) -> dict[str, float]:
  """Shares renormalised over the included sources: excluded sources' shares are spread pro rata."""
  total = sum(s.share[phase] for s in sources)
  if total <= 0:
    raise DataError(f"phase {phase!r}: the included sources ({', '.join(s.name for s in sources)}) all have "
                    "share 0; nothing to train on.")
  return {s.name: s.share[phase] / total for s in sources}
