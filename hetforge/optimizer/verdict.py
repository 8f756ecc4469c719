"""The verification result: a typed verdict, never an exception."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field, fields


class Status(enum.StrEnum):
    """The verdict on a candidate."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


class RejectKind(enum.StrEnum):
    """Why a candidate is rejected. Each rule that produces one says why in a comment."""

    LOAD_ERROR = "load_error"  # the candidate does not import or build
    EXCEPTION = "exception"  # the candidate raised while running
    CRASHED = "crashed"  # the worker died of a signal (segfault, abort)
    EXITED = "exited"  # the worker exited (os._exit, sys.exit)
    TIMEOUT = "timeout"  # no answer before the deadline (a hang)
    OUT_OF_MEMORY = "out_of_memory"  # a runaway allocation
    PROTOCOL = "protocol"  # malformed replies: the harness was tampered with
    MISMATCH = "mismatch"  # values differ beyond the tolerance
    SHAPE = "shape"  # wrong output shape or structure
    DTYPE = "dtype"  # wrong output dtype
    NAN_INF = "nan_inf"  # NaN or Inf where the reference has none, or the other way round
    NOT_PLAIN = "not_plain_tensor"  # a subclass, a meta tensor, another layout or device
    MODIFIES_INPUTS = "modifies_inputs"  # writes into its inputs: unsafe inside a pipeline
    NOT_FASTER = "not_faster"  # below the required speedup
    REFERENCE_FAILED = "reference_failed"  # the reference itself did not run: nothing can be judged
    CONFINEMENT = "confinement"  # reached for the network, files outside scratch, secrets or too many processes
    # An LLM agent's turn that brought nothing to verify; recorded as a rejected candidate, never run.
    NO_CODE = "no_code"  # the answer has no Python code block
    ENDPOINT_ERROR = "endpoint_error"  # the model's endpoint failed: no answer at all
    # A graph agent (rewrites, library) that could not capture the stage: nothing to transform, never run.
    NO_GRAPH = "no_graph"  # neither torch.export nor torch.fx captured it; the message names what broke


class Flag(enum.StrEnum):
    """Accepted, but a human reviews before promotion. Static-check flags are `static:<rule>` strings."""

    SPEEDUP = "implausible_speedup"
    INSENSITIVE = "insensitive_output"
    HIDDEN_WORK = "hidden_work"
    # The source reads its environment, argv, process or parent, or the judge's files: it can tell a verification
    # run from serving and compute the right answer only when judged (static_checks.context_flag).
    INSPECTS_CONTEXT = "inspects_context"


STATIC_FLAG_PREFIX = "static:"  # flags from static checks of the source: `static:<rule>`
EXCERPT_CHARS = 400  # the most of a candidate's own text (its exception, its log) a verdict quotes


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` as a verdict may quote it: printable ASCII only (no terminal escapes, no forged lines), whitespace
    runs as one space, at most `limit` characters. A candidate's exception is a channel out of its confinement
    (whatever it read goes into the message): bounded, it carries little, and nothing that acts on a reader."""
    clean = "".join(c if " " <= c <= "~" else " " if c.isspace() else "?" for c in str(text)[: limit * 4])
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


@dataclass(frozen=True)
class Reason:
    """Why a candidate was rejected. `cause`: what made the reference fail (REFERENCE_FAILED from a worker
    that timed out, crashed or exited), else None."""

    kind: RejectKind
    message: str
    cause: RejectKind | None = None

    @classmethod
    def from_dict(cls, doc: dict) -> Reason:
        cause = doc.get("cause")
        return cls(RejectKind(doc["kind"]), doc["message"], RejectKind(cause) if cause else None)


@dataclass(frozen=True)
class TrialResult:
    """One correctness trial: fresh inputs under `seed`, every input set (main + variants)."""

    seed: int
    max_abs_err: float
    max_rel_err: float
    ok: bool

    @classmethod
    def from_dict(cls, doc: dict) -> TrialResult:
        """From `asdict` or its JSON (where an infinite error became null: read back as inf)."""

        def err(value) -> float:
            return float("inf") if value is None else float(value)

        return cls(int(doc["seed"]), err(doc["max_abs_err"]), err(doc["max_rel_err"]), bool(doc["ok"]))


@dataclass
class Verdict:
    verdict: Status
    reasons: list[Reason] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    needs_review: bool = False
    trials: list[TrialResult] = field(default_factory=list)
    reference_ms: float | None = None
    candidate_ms: float | None = None
    speedup: float | None = None  # reference_ms / candidate_ms
    # the speedup's rank-based interval over the timing rounds (`stats.Interval.to_dict()`: low, high, confidence,
    # claim); empty when not timed
    interval: dict = field(default_factory=dict)
    spread: dict = field(default_factory=dict)  # per side: p10 and p90 of per-call ms, host-clock ms
    device: str = ""
    precision: str = "strict"
    baseline: str = "eager"
    versions: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    phases_s: dict = field(default_factory=dict)  # wall seconds: start (workers up, modules built), correctness, timing
    confinement: dict = field(
        default_factory=dict
    )  # what the candidate's worker was confined by (confine.confine's report)
    notes: list[str] = field(
        default_factory=list
    )  # facts that need no review (e.g. more exact than the float32 reference)

    @property
    def accepted(self) -> bool:
        return self.verdict == Status.ACCEPTED

    @property
    def claim(self) -> str | None:
        """'faster', 'slower' or 'within_noise' (see `stats.Claim`); None when not timed."""
        return self.interval.get("claim")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> Verdict:
        """The inverse of `to_dict` (and of `to_json` after json.loads): enums, reasons and trials rebuilt.
        Keys a stored verdict lacks take their defaults; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["verdict"] = Status(doc["verdict"])
        values["reasons"] = [Reason.from_dict(r) for r in doc.get("reasons") or []]
        values["trials"] = [TrialResult.from_dict(t) for t in doc.get("trials") or []]
        for key in ("flags", "notes"):
            values[key] = list(doc.get(key) or [])
        for key in ("interval", "spread", "versions", "phases_s", "confinement"):
            values[key] = dict(doc.get(key) or {})
        return cls(**values)

    def to_json(self) -> str:
        """One line of JSON; non-finite numbers (an infinite error) become null."""
        return json.dumps(_finite(self.to_dict()), allow_nan=False, default=str, separators=(",", ":"))


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
