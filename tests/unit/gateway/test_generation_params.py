"""GenerationParams are checked once (services.runtime.limits): the gateway refuses, before its first Ask event,
exactly what the generation service would refuse, with the same words, under the same setting."""

from __future__ import annotations

import pytest

from services.gateway.config import GatewayConfig
from services.generation.config import GenerationConfig
from services.generation.validation import validate
from services.runtime.errors import InvalidArgument
from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, generation_pb2

from .test_ask_pipeline import make

ENVIRON = {"RAGFLEET_GENERATION_MAX_TOKENS_LIMIT": "100"}
GP = common_pb2.GenerationParams


@pytest.mark.parametrize("params", [
    GP(max_tokens=101), GP(max_tokens=0), GP(temperature=2.5), GP(top_p=0.0), GP(top_p=1.5),
    GP(model="m" * 257), GP(stop=["a", "b", "c", "d", "e"]), GP(stop=[""]), GP(stop=["s" * 257]),
])
def test_gateway_and_generation_refuse_the_same_params_in_the_same_words(params: common_pb2.GenerationParams):
    with pytest.raises(InvalidArgument) as at_gateway:
        make(limits=GatewayConfig.from_env(ENVIRON).ask).plan("t", gateway_pb2.AskRequest(question="q",
                                                                                         params=params))
    with pytest.raises(InvalidArgument) as at_generation:
        validate(generation_pb2.GenerateRequest(question="q", params=params),
                 GenerationConfig.from_env(ENVIRON).limits)
    assert at_gateway.value.message == at_generation.value.message
    assert at_gateway.value.message.startswith("params.")


def test_params_within_the_limits_pass_both():
    params = GP(max_tokens=100, temperature=0.0, top_p=1.0, model="m", stop=["\n\n"])
    make(limits=GatewayConfig.from_env(ENVIRON).ask).plan("t", gateway_pb2.AskRequest(question="q", params=params))
    validate(generation_pb2.GenerateRequest(question="q", params=params), GenerationConfig.from_env(ENVIRON).limits)
