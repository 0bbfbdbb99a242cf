"""Response shapes, for the OpenAPI document at /docs (handlers return plain JSON)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.core.names import HANDLE, NAME

# What the handlers check, written down for the document (they do their own checks).
NAME_PATTERN = f"^{HANDLE}$"
"""Workspace, token and secret names."""
POLICY_NAME_PATTERN = f"^{NAME}$"
"""Policy and app names."""
ENV_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""Keys of a secret: environment variable names."""

MAX_OPTION_S = 7 * 24 * 3600.0
"""The most a call's `ttl` or `timeout` may be: a week."""
Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the function"
    )
    webhook: str | None = Field(
        None, description="an http(s) URL the server POSTs the job's body to once it ends"
    )
    ttl: float | None = Field(
        None,
        gt=0,
        le=MAX_OPTION_S,
        description="seconds the job may wait in the queue; past them it ends TIMED_OUT unrun",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_OPTION_S,
        description="the job's own execution timeout in seconds, in place of its function's",
    )


class Purged(BaseModel):
    removed: int = Field(description="queued jobs cancelled")


class JobError(BaseModel):
    type: str
    message: str
    traceback: str | None = None


class Timings(BaseModel):
    queue_ms: float
    cold_start_ms: float
    load_ms: float
    exec_ms: float
    post_ms: float
    total_ms: float


class JobBody(BaseModel):
    id: str
    app: str
    function: str
    status: Status
    output: Any = None
    error: JobError | None = None
    timings: Timings | None = None
    cost: dict[str, float] | None = Field(None, description="usd, gpu_seconds, cpu_seconds")
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="the tags its usage carries: the app's, the function's, then its policy's",
    )
    reason: str | None = Field(None, description="why a queued job still waits (no GPU free)")
    attempts: int = 0
    created_at: float
    finished_at: float | None = None


class Accepted(BaseModel):
    id: str
    status: Status


class ErrorDetail(BaseModel):
    code: str
    message: str
    budget_usd: float | None = Field(None, description="402 only: the policy's budget")
    spent_usd: float | None = Field(None, description="402 only: spent this period")
    reset_at: float | None = Field(None, description="402 only: when the period resets")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    jobs: dict[str, int]
    workers: dict[str, int]
    version: int


class DeployRequest(BaseModel):
    name: str = Field(pattern=POLICY_NAME_PATTERN)
    filename: str = Field(
        description="the deployed file: `hello.py`, or its path in the bundle (`pkg/main.py`)"
    )
    source: str | None = Field(None, description="the file's text, for a one-file deploy")
    bundle: str | None = Field(
        None, description="the sha256 of a bundle uploaded with PUT /v1/bundles/{digest}"
    )
    module: str | None = Field(None, description="the bundle's module that defines the app")
    wait: bool = Field(
        True, description="answer once each function's code has imported (false: at once)"
    )
    tags: dict[str, str] = Field(default_factory=dict)
    functions: list[dict[str, Any]] = Field(
        min_length=1, description="what `ember deploy` sends for each function"
    )


class BundleInfo(BaseModel):
    digest: str
    size: int | None = Field(None, description="bytes of its files, uncompressed")
    files: int | None = None


class EnvSpecBody(BaseModel):
    base: Literal["standard", "ai"] = "standard"
    python: str | None = Field(None, pattern=r"^3\.\d{1,2}$")
    packages: list[str] | None = Field(
        None, description="requirements: `pkg==1.2` (null or left out: none)"
    )
    lock: list[str] | None = Field(None, description="`name==version --hash=...` lines")
    variables: dict[str, str] | None = Field(
        None, description="what its workers' environment gets (null or left out: none)"
    )


class EnvRequest(BaseModel):
    spec: EnvSpecBody


class EnvView(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    status: Literal["building", "ready", "failed"]
    spec: dict[str, Any]
    used_by: list[str] = Field(
        default_factory=list, description="the deployed versions whose functions run in it"
    )


class EnvList(BaseModel):
    envs: list[EnvView]


class EnvPruned(BaseModel):
    removed: list[str]
    dry_run: bool


class Deployed(BaseModel):
    app: str
    version: int
    functions: list[str]
    bundle: str | None = None
    envs: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list, description="e.g. a GPU no node has")


class FunctionInfo(BaseModel):
    name: str
    unit: str
    kind: str
    params: dict[str, Any]
    spec: dict[str, Any]


class AppInfo(BaseModel):
    name: str
    tags: dict[str, str]
    version: int
    filename: str
    functions: list[FunctionInfo]
    created_at: float
    updated_at: float
    bundle: str | None = Field(None, description="the sha256 of its code bundle")
    module: str | None = None
    envs: dict[str, str] = Field(
        default_factory=dict, description="the Env id of each function or class that has one"
    )


class AppList(BaseModel):
    apps: list[AppInfo]


class WorkerList(BaseModel):
    workers: list[dict[str, Any]] = Field(description="the workspace's live workers")


class NodeList(BaseModel):
    nodes: list[dict[str, Any]] = Field(description="GPUs of each node, simulated ones labelled")


class UsageGroup(BaseModel):
    key: dict[str, Any] = Field(description="the values of the group_by fields")
    start: float | None = Field(None, description="the bucket's start, with a granularity")
    cost_usd: float
    gpu_seconds: float
    cpu_seconds: float
    cold_starts: int
    idle_fraction: float


class UsageGroups(BaseModel):
    groups: list[UsageGroup]


class LogLines(BaseModel):
    lines: list[dict[str, Any]] = Field(description="each with its time and job id")


class WorkspaceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    scope: Literal["read", "invoke", "deploy", "admin"] = "read"
    policy: str | None = Field(None, description="the name of a policy of the workspace")
    expires_in: float | None = Field(
        None, gt=0, le=10 * 365 * 86400, description="seconds until the token expires"
    )


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=POLICY_NAME_PATTERN)
    tags: dict[str, str] | None = None
    budget_usd: float | None = Field(None, ge=0, description="US dollars per period")
    period: Literal["day", "week", "month"] = "month"
    action: Literal["alert", "block"] = Field(
        "alert", description="block needs a budget_usd to block at"
    )
    max_gpus: int | None = Field(None, ge=0)
    allowed_gpus: list[str] | str | None = Field(
        None, description="GPU types, as a list or comma-separated: ['L4', 'A10G'] or 'L4,A10G'"
    )
    webhook: str | None = Field(None, description="an http(s) URL that gets a POST on alerts")


class SecretRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: dict[str, str] = Field(
        min_length=1,
        max_length=100,
        description="KEY=VALUE pairs for the environment (not EMBER_*, PATH, HOME, ...)",
        json_schema_extra={"propertyNames": {"pattern": ENV_KEY_PATTERN}},
    )


class WorkspaceCreated(BaseModel):
    workspace: str
    token_name: str
    scope: str
    token: str = Field(description="shown in this answer only")


class Workspace(BaseModel):
    name: str
    created_at: float


class Workspaces(BaseModel):
    workspaces: list[Workspace]


class TokenCreated(BaseModel):
    name: str
    scope: str
    policy: str | None
    created_at: float
    expires_at: float | None
    token: str = Field(description="shown in this answer only")


class TokenInfo(BaseModel):
    name: str
    scope: str
    policy: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    bootstrap: bool = False


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class Revoked(BaseModel):
    name: str
    revoked_at: float


class PolicyStatus(BaseModel):
    name: str
    tags: dict[str, str]
    budget_usd: float | None
    period: Literal["day", "week", "month"]
    action: Literal["alert", "block"]
    max_gpus: int | None
    allowed_gpus: list[str] | None
    webhook: str | None
    created_at: float | None = None
    spent_usd: float = Field(description="spent in the current period")
    period_start: float
    reset_at: float
    blocked: bool
    gpus_held: int = 0


class PolicyList(BaseModel):
    policies: list[PolicyStatus]


class Deleted(BaseModel):
    name: str
    deleted: bool


class SecretInfo(BaseModel):
    name: str
    keys: list[str] = Field(description="the key names; values never leave the server")
    created_at: float
    updated_at: float
    used_by: list[str] = Field(default_factory=list, description="APP/FUNCTION naming it")


class SecretList(BaseModel):
    secrets: list[SecretInfo]


class AuditEvent(BaseModel):
    id: int
    ts: float
    workspace: str | None
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any] | None
    ip: str | None
    count: int = 1
    """Refusals without a valid token: how many this row counts (per source, reason, minute)."""
    last_ts: float | None = None
    """The last of the refusals this row counts (None on every other event)."""


class AuditEvents(BaseModel):
    events: list[AuditEvent]


class Finding(BaseModel):
    code: str
    severity: Literal["high", "medium", "low"]
    message: str
    fix: str


class Findings(BaseModel):
    findings: list[Finding]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing, wrong, revoked or expired token"},
    403: {"model": ErrorBody, "description": "the token's scope or policy does not allow this"},
    404: {"model": ErrorBody, "description": "unknown app, function or job"},
    409: {"model": ErrorBody, "description": "clashes with what exists"},
    413: {"model": ErrorBody, "description": "request body over the payload limit"},
    422: {"model": ErrorBody, "description": "input that does not fit"},
}


class Whoami(BaseModel):
    workspace: str
    scope: Literal["read", "invoke", "deploy", "admin"]
    token: str = Field(description="the token's name")


class SeriesPoint(BaseModel):
    t: int = Field(description="epoch seconds: the start of the step")
    calls: int = Field(description="jobs that ended in the step")
    failed: int = Field(description="of them, FAILED or TIMED_OUT")
    cold_starts: int = Field(description="of them, jobs that waited for a worker to start")
    p50: Timings | None = Field(description="the terms of one call at that rank of total_ms")
    p95: Timings | None
    p99: Timings | None
    workers: dict[str, float] = Field(description="mean live workers per state over the step")


class SeriesTotals(BaseModel):
    calls: int
    failed: int
    cold_starts: int


class SeriesView(BaseModel):
    window: int
    step: int
    now: float
    points: list[SeriesPoint] = Field(description="oldest first, one per step")
    totals: SeriesTotals


class JobSummary(BaseModel):
    id: str
    app: str
    function: str
    status: Status
    created_at: float
    finished_at: float | None
    attempts: int
    total_ms: float | None
    cost_usd: float | None
    error_type: str | None
    tags: dict[str, str]


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as cursor= for the next page; null: last")


class JobInput(BaseModel):
    input: str = Field(description="the input as JSON text, cut at 65536 bytes")
    bytes: int = Field(description="the full input's size in bytes")
    truncated: bool
