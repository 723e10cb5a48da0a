"""Findings of a conformance check as typed values (kind, explanation, evidence), and the verdicts and exit codes
that follow from them.

A case with no finding agrees with the reference. A finding is *explained* when a known convention or upstream bug,
re-run as a reference, reproduces the target under the same rule (its ``id`` names that explanation, e.g.
``diffusers-12633``); otherwise it is unexplained and its ``id`` is its kind. ``--accept`` takes ids or kinds: an
accepted finding no longer fails a CI gate.

Kinds
-----
schedule   the target's alphas_cumprod (or sigma table) differs from the reference's for the configuration asked
grid       the target's timesteps / sigmas differ from the reference's for the spacing asked
step       a step disagrees with the sampler's paper-form step beyond the rounding rule
nonfinite  the target produced NaN / Inf where the reference is finite
structure  the target calls the model a different number of times than the sampler
call       the target evaluated the model at another level or sample than the sampler's stage (a trace judge)
exception  the target raised
timeout    the case ran past its time limit
exit       the target called sys.exit
kernel     a kernel's output breaks the error rule |kernel - ref64| <= 2 |naive - ref64| + 2 ulp
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Finding", "KINDS", "EXIT_AGREE", "EXIT_UNEXPLAINED", "EXIT_KNOWN", "case_verdict", "exit_code",
           "headline", "is_accepted", "read_accept_file"]

KINDS = ("schedule", "grid", "step", "nonfinite", "structure", "call", "exception", "timeout", "exit", "kernel")
EXIT_AGREE, EXIT_UNEXPLAINED, EXIT_KNOWN = 0, 1, 4


@dataclass(frozen=True)
class Finding:
    """One disagreement of a target with the reference.

    kind : one of KINDS
    summary : one line a person reads (no parsing needed: every field is typed)
    explained : True when ``id`` names a hypothesis (a known convention or bug) that reproduces the target
    id : the explanation's stable id when explained, else the kind
    evidence : numbers behind the finding (indices, values, bounds, per-step ratios) as JSON-serialisable values
    """

    kind: str
    summary: str
    explained: bool = False
    id: str = ""
    evidence: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"finding kind must be one of {KINDS}, got {self.kind!r}")
        if not self.id:
            object.__setattr__(self, "id", self.kind)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        return cls(**{k: d[k] for k in ("kind", "summary", "explained", "id", "evidence") if k in d})

    def __str__(self) -> str:
        return f"{'explained' if self.explained else 'unexplained'} [{self.id}]: {self.summary}"


def _as_finding(f) -> Finding:
    return f if isinstance(f, Finding) else Finding.from_dict(f)


def is_accepted(finding, accept) -> bool:
    f = _as_finding(finding)
    return bool(accept) and (f.id in accept or f.kind in accept)


def case_verdict(findings) -> str:
    """'pass' with no finding, 'known' when every finding is explained, else 'fail'."""
    fs = [_as_finding(f) for f in findings]
    if not fs:
        return "pass"
    return "known" if all(f.explained for f in fs) else "fail"


def exit_code(cases, accept=()) -> int:
    """0: every case agrees (or its findings are accepted); 4: only explained findings remain; 1: an unexplained
    finding remains."""
    remaining = [_as_finding(f) for c in cases for f in c.get("findings", []) if not is_accepted(f, accept)]
    if any(not f.explained for f in remaining):
        return EXIT_UNEXPLAINED
    return EXIT_KNOWN if remaining else EXIT_AGREE


def headline(cases, accept=()) -> str:
    """'PASS', 'PASS with N known findings' (explained, or accepted), or 'FAIL (N unexplained findings)'.

    Never a bare PASS over a case with a finding, all-NaN cases included (their finding is 'nonfinite')."""
    fs = [_as_finding(f) for c in cases for f in c.get("findings", [])]
    unexplained = [f for f in fs if not f.explained and not is_accepted(f, accept)]
    if unexplained:
        return f"FAIL ({len(unexplained)} unexplained finding{'s' if len(unexplained) != 1 else ''})"
    if fs:
        accepted = sum(is_accepted(f, accept) for f in fs)
        return (f"PASS with {len(fs)} known finding{'s' if len(fs) != 1 else ''}"
                + (f" ({accepted} accepted)" if accepted else ""))
    return "PASS"


def read_accept_file(path) -> list:
    """Ids or kinds to accept, one per line; '#' starts a comment."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out
