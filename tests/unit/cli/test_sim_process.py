"""SimLLMProcess: the sim as its own process, as tests and benchmarks start it."""

from __future__ import annotations

import json
import urllib.request

from services.cli.sim_llm import SimLLMProcess


def test_starts_with_settings_is_driven_live_and_stops():
    sim = SimLLMProcess(max_tokens=7, ttft_ms=0)
    try:
        assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = urllib.request.Request(sim.base_url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 7
        sim.configure({"max_tokens": 3}, failure_rate=0.0)
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 3
        assert sim.stats()["chat_requests"] == 2
        sim.reset()
        assert sim.stats()["chat_requests"] == 0
    finally:
        sim.stop()
    assert sim.process.poll() is not None
