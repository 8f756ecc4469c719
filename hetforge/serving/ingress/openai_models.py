"""Bodies of the OpenAI-compatible routes: the chat completion request agents send, and the answers.

The request ignores fields it does not use (agent frameworks send `user`, `metadata`, `logprobs`,
`store` ...: refusing them would break those clients) but checks every field it uses, so a bad value
is the client's 400 in OpenAI's error format, naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The function's name.")
    description: str | None = Field(default=None, description="What it does, for the model.")
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of its arguments.")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _named(cls, value: dict[str, str]) -> dict[str, str]:
        if not value.get("name"):
            raise ValueError('needs {"name": ...}')
        return value


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="answer", max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", description="The answer's JSON schema.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type json_schema needs a `json_schema` object: {"name": ..., "schema": {...}}')
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request, as far as a pipeline serves it."""

    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, Any]] = Field(min_length=1, description="The conversation: OpenAI messages.")
    model: str | None = Field(default=None, description="A name the pipeline answers (GET /v1/models).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=131_072)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=131_072)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="One choice per request.")

    @field_validator("messages")
    @classmethod
    def _roles(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(value):
            if m.get("role") == "developer":  # OpenAI's newer name for the system role
                value[i] = m = {**m, "role": "system"}
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, developer, user, assistant or tool")
        return value

    def options(self) -> dict[str, Any]:
        """What the output LLM stage takes from the request (None: the stage's own setting)."""
        fmt = None
        if self.response_format is not None and self.response_format.type != "text":
            fmt = {"type": self.response_format.type}
            if self.response_format.json_schema is not None:
                fmt["json_schema"] = {"schema": self.response_format.json_schema.schema_ or {"type": "object"}}
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        out = {
            "tools": [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": fmt,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }
        return {k: v for k, v in out.items() if v is not None}


class OpenAiError(Exception):
    """A refusal in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self, request_id: str, stage: str | None = None) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error" if self.code != "model_not_found" else "invalid_request_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        # hetforge's own fields beside OpenAI's: which stage failed, and the request id to find it in the logs
        return {"error": {**error, "stage": stage, "request_id": request_id, "status": self.status}}


def usage_of(answer: Any) -> dict:
    usage = dict(answer.get("usage") or {}) if isinstance(answer, dict) else {}
    for key in ("prompt_tokens", "completion_tokens"):
        usage.setdefault(key, 0)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage
