"""Every environment variable is declared once, read only through its declaration, and the README tables and the
Kubernetes manifests agree with the declarations (services/runtime/config.py, services/*/config.py)."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from services.runtime.config import SERVICE, Env, ServerConfig, lookup
from services.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SERVICES_DIR = ROOT / "services"
K8S = ROOT / "deploy" / "k8s"
REGISTRY_MODULE = SERVICES_DIR / "runtime" / "config.py"

_spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
assert _spec and _spec.loader
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
VARIABLES = gen.load()

# Reads that bypass a declaration: the environment by hand, or Env's name-based parsers.
RAW_READ = re.compile(r"""(?:getenv|environ(?:\.get)?)\s*[(\[]\s*f?["']RAGFLEET_""")
NAMED_READ = re.compile(r"""\bEnv\(\s*f?["']|\.(?:str|optional_str|int|float|bool|list)\(\s*f?["'][A-Z]""")
NAME = re.compile(r"RAGFLEET_[A-Z0-9_]*[A-Z0-9]")
DECLARATION = re.compile(r"""^\w+ = declare\(\s*f?["']([A-Z0-9_{}<>]+)["']""", re.M)  # at module level


def _sources() -> Iterator[tuple[Path, str]]:
    for path in sorted(SERVICES_DIR.rglob("*.py")):
        if "pb" not in path.relative_to(SERVICES_DIR).parts:
            yield path, path.read_text()


def test_every_ragfleet_read_in_services_goes_through_a_declaration() -> None:
    bypass = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
              for path, text in _sources() if path != REGISTRY_MODULE
              for m in (*RAW_READ.finditer(text), *NAMED_READ.finditer(text))]
    assert not bypass, "read the variable through its declaration (Env(environ=...).read(VAR)):\n" + "\n".join(bypass)


def test_every_ragfleet_name_the_code_mentions_is_declared() -> None:
    # A name in a message, a comment or a docstring that no declaration answers to is a renamed or removed variable.
    prefixes = {f"RAGFLEET_{name.upper()}" for name in gen.SERVICES} | {"RAGFLEET_LLM", "RAGFLEET_INTERNAL"}
    known = {alias for var in VARIABLES for alias in var.aliases}
    unknown = sorted({f"{name} ({path.relative_to(ROOT)})" for path, text in _sources() for name in NAME.findall(text)
                      if name not in prefixes and name not in known and lookup(name) is None})
    assert not unknown, f"RAGFLEET_* names with no declaration: {unknown}"


def test_no_variable_is_declared_twice() -> None:
    written = Counter(name for _, text in _sources() for name in DECLARATION.findall(text))
    assert [name for name, count in written.items() if count > 1] == []
    names = Counter(name for var in VARIABLES for name in (var.name, *var.aliases))
    assert [name for name, count in names.items() if count > 1] == []
    assert len(written) == len(VARIABLES), "every declaration is imported by scripts/gen_config_docs.py's load()"


@pytest.mark.parametrize("var", VARIABLES, ids=lambda var: var.name)
def test_each_declaration_is_complete_and_its_default_valid(var: Any) -> None:
    assert var.kind in (int, float, bool, str, tuple) and var.help and var.section in gen.SECTIONS
    assert var.default is None or isinstance(var.default, var.kind) or (var.kind is float and type(var.default) is int)
    if var.default is not None:
        var.check(var.default)


def test_the_readme_tables_are_the_generated_ones() -> None:
    readme = (ROOT / "README.md").read_text()
    assert gen.BEGIN in readme and gen.END in readme
    assert gen.replace_tables(readme, gen.render(VARIABLES)) == readme, \
        "README.md's configuration tables are stale: run .venv/bin/python scripts/gen_config_docs.py"


def test_deprecated_names_still_work_and_the_new_name_wins() -> None:
    from services.gateway.config import GatewayConfig

    old = GatewayConfig.from_env({"RAGFLEET_GATEWAY_EMBED_TIMEOUT_S": "1.5", "RAGFLEET_GATEWAY_CACHE_TTL_S": "60"})
    assert (old.budgets.embed, old.cache.ttl_seconds) == (1.5, 60)
    both = GatewayConfig.from_env({"RAGFLEET_GATEWAY_EMBED_TIMEOUT_S": "1.5",
                                   "RAGFLEET_GATEWAY_EMBED_TIMEOUT_SECONDS": "0.5"})
    assert both.budgets.embed == 0.5
    with pytest.raises(ConfigError, match="RAGFLEET_GATEWAY_EMBED_TIMEOUT_S='soon' is not a number"):
        GatewayConfig.from_env({"RAGFLEET_GATEWAY_EMBED_TIMEOUT_S": "soon"})


def test_the_dataclass_defaults_are_what_production_reads() -> None:
    # Benchmarks and tests build the dataclasses directly: their defaults must be the declarations' defaults.
    from services.gateway.config import COALESCE_WINDOW_MS

    for name in gen.SERVICES:
        config_class = getattr(importlib.import_module(f"services.{name}.config"), f"{name.capitalize()}Config")
        built = config_class(server=ServerConfig.from_env(name, {}))
        if name == "gateway":  # an in-process pipeline relays deltas one for one; the service coalesces
            built = replace(built, ask=replace(built.ask, coalesce_window=COALESCE_WINDOW_MS.default / 1000))
        assert config_class.from_env({}) == built, name


def _manifest_variables() -> Iterator[tuple[str, str, str | None]]:
    """(where, name, literal value or None) of every RAGFLEET_* key in a ConfigMap or a container's env."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if key.startswith("RAGFLEET_"):
                        yield f"{path.name} {doc['metadata']['name']}", key, str(value)
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                for entry in container.get("env", []):
                    if entry["name"].startswith("RAGFLEET_"):
                        yield f"{path.name} {container['name']}", entry["name"], entry.get("value")


def test_every_ragfleet_key_in_the_manifests_is_declared_and_valid() -> None:
    seen, problems = 0, []
    for where, name, value in _manifest_variables():
        seen += 1
        var = lookup(name)
        if var is None:
            problems.append(f"{where}: {name} is not declared (a typo, or a deprecated name: use the new one)")
        elif value is not None:
            try:
                Env(environ={name: value}).read(var)
            except ConfigError as exc:
                problems.append(f"{where}: {exc}")
    assert seen > 20 and not problems, "\n".join(problems)


def test_per_server_names_resolve_for_each_service_only() -> None:
    assert lookup("RAGFLEET_GATEWAY_PORT").default == 0 and SERVICE not in lookup("RAGFLEET_GATEWAY_PORT").name
    assert lookup("RAGFLEET_NOSUCH_PORT") is None
    with pytest.raises(ConfigError, match="RAGFLEET_RETRIEVAL_GRACE_SECONDS=-1.0 must be >= 0"):
        Env(environ={"RAGFLEET_RETRIEVAL_GRACE_SECONDS": "-1"}).read(lookup("RAGFLEET_RETRIEVAL_GRACE_SECONDS"))
