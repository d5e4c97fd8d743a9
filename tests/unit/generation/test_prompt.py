"""Prompt assembly: relevance packing within the token budget, [n] numbering, history trimmed in one step."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.generation.config import GenerationConfig, ModelConfig, PromptBudget
from services.generation.prompt import SUMMARY_PREFIX, PromptBuilder, TokenCounter, render_passage
from services.runtime.config import ServerConfig
from services.runtime.errors import InvalidArgument
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

COUNTER = TokenCounter()
USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def config(**kw) -> GenerationConfig:
    return GenerationConfig(server=ServerConfig("generation"), **kw)


def passage(number: int, words: int, score: float) -> common_pb2.Passage:
    return common_pb2.Passage(number=number, title=f"Doc {number}", score=score,
                              text=" ".join(f"word{number}x{i}" for i in range(words)) + ".")


def request(passages=(), history=(), **params) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(question="What does the evidence say?", passages=list(passages),
                                          history=list(history), params=common_pb2.GenerationParams(**params))


def cost(p: common_pb2.Passage) -> int:
    return COUNTER.count(render_passage(p)) + 2


async def test_packs_by_relevance_within_budget_and_keeps_numbers():
    ps = [passage(1, 50, 0.2), passage(2, 50, 0.9), passage(3, 50, 0.5), passage(4, 5, 0.1)]
    budget = cost(ps[1]) + cost(ps[2]) + cost(ps[3]) + 1  # the two best and the tiny one fit; not the 3rd-best
    builder = PromptBuilder(config(budget=PromptBudget(passage_tokens=budget)), COUNTER)
    prompt = await builder.build(request(ps))
    assert prompt.passages_used == [2, 3, 4]
    user = prompt.messages[-1]["content"]
    assert user.index("[2] Doc 2") < user.index("[3] Doc 3") < user.index("[4] Doc 4")
    assert "[1] Doc 1" not in user and user.endswith("Question: What does the evidence say?")
    assert prompt.messages[0]["role"] == "system"
    assert prompt.prompt_tokens == sum(COUNTER.count(m["content"]) + 4 for m in prompt.messages) + 3


_TEXT = st.text(alphabet=st.sampled_from(list("ab Zé中7.,:;'\"[]()-\n\r\t ")) | st.characters(exclude_categories=("Cs",)), max_size=160)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_TEXT, _TEXT), max_size=4), _TEXT.filter(str.strip),
       st.sampled_from(["cl100k_base", "o200k_base"]))
async def test_prompt_tokens_are_the_whole_messages_count_whatever_the_text(parts, question, encoding):
    """The user message is counted in cached parts (before each "[n]" and "Question"): the sum must be exactly the
    count of the whole message, the message itself unchanged."""
    ps = [common_pb2.Passage(number=i + 1, title=title, text=text, score=1.0) for i, (title, text) in enumerate(parts)]
    builder = PromptBuilder(config(defaults=ModelConfig(encoding=encoding)), COUNTER)
    prompt = await builder.build(generation_pb2.GenerateRequest(question=question, passages=ps))
    rendered = "\n\n".join(render_passage(p) for p in prompt.passages)
    q = question.strip()
    assert prompt.messages[-1]["content"] == (f"Sources:\n\n{rendered}\n\nQuestion: {q}" if prompt.passages
                                              else f"Question: {q}")
    assert prompt.prompt_tokens == sum(COUNTER.count(m["content"], encoding) + 4 for m in prompt.messages) + 3
    # the budget's fixed part (the message before any passage) is counted from the same parts
    assert COUNTER.count(f"Sources:\n\nQuestion: {q}", encoding) == (COUNTER.count("Sources:\n\n", encoding)
                                                                      + COUNTER.count(f"Question: {q}", encoding))


async def test_context_window_limits_passages_too():
    ps = [passage(i, 200, 1.0 - i / 10) for i in range(1, 6)]
    small = config(defaults=ModelConfig(context_tokens=1000, max_tokens=200))
    prompt = await PromptBuilder(small, COUNTER).build(request(ps))
    assert 1 <= len(prompt.passages) < 5
    assert prompt.prompt_tokens + 200 <= 1000


async def test_best_passage_is_truncated_when_nothing_fits():
    big = passage(7, 2000, 1.0)
    prompt = await PromptBuilder(config(budget=PromptBudget(passage_tokens=100)), COUNTER).build(request([big]))
    assert prompt.passages_used == [7]
    assert COUNTER.count(prompt.passages[0].text) <= 100 and big.text.startswith(prompt.passages[0].text)


async def test_a_truncated_best_passage_counts_its_title_against_the_window():
    # A long title on the one passage in a tight window: the cut must leave room for "[n] title" too.
    long_title = common_pb2.Passage(number=1, score=1.0, text="evidence " * 2000,
                                    title="A very long descriptive title about randomized controlled trials " * 2)
    small = config(defaults=ModelConfig(context_tokens=1000, max_tokens=500))
    prompt = await PromptBuilder(small, COUNTER).build(request([long_title]))
    assert prompt.passages_used == [1]
    assert prompt.prompt_tokens + 500 <= 1000


async def test_question_that_cannot_fit_is_invalid():
    small = config(defaults=ModelConfig(context_tokens=300, max_tokens=280))
    with pytest.raises(InvalidArgument, match="context window of 300 tokens"):
        await PromptBuilder(small, COUNTER).build(request())


def turns(n_pairs: int, words: int = 30) -> list[common_pb2.ChatTurn]:
    out = []
    for i in range(n_pairs):
        out.append(common_pb2.ChatTurn(role=USER, content=f"question {i} " + "blah " * words))
        out.append(common_pb2.ChatTurn(role=ASSISTANT, content=f"answer {i} " + "blah " * words))
    return out


async def test_history_within_budget_is_kept_whole():
    prompt = await PromptBuilder(config(), COUNTER).build(request(history=turns(3)))
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant"] * 1 + \
        ["user", "assistant"] * 2 + ["user"]
    assert prompt.history_dropped == 0


async def test_history_over_budget_drops_oldest_pairs_in_one_step():
    history = turns(10)
    pair_cost = sum(COUNTER.count(t.content) + 4 for t in history[:2])
    builder = PromptBuilder(config(budget=PromptBudget(history_tokens=int(pair_cost * 3.5))), COUNTER)
    prompt = await builder.build(request(history=history))
    kept = [m["content"] for m in prompt.messages[1:-1]]
    assert prompt.history_dropped == 14 and len(kept) == 6
    assert kept[0].startswith("question 7") and kept[-1].startswith("answer 9")  # newest kept, pairs intact


async def test_history_summarised_when_a_summariser_is_configured():
    calls = []

    async def summariser(old, max_tokens):
        calls.append((len(old), max_tokens))
        return "The user asked about blah nine times."

    history = turns(10)
    pair_cost = sum(COUNTER.count(t.content) + 4 for t in history[:2])
    cfg = config(budget=PromptBudget(history_tokens=pair_cost * 3 + 300))
    prompt = await PromptBuilder(cfg, COUNTER, summariser=summariser).build(request(history=history))
    assert prompt.history_summarised and len(calls) == 1
    assert prompt.messages[1] == {"role": "system", "content": SUMMARY_PREFIX + "The user asked about blah nine times."}
    assert prompt.messages[2]["content"].startswith("question ")
    assert calls[0][0] == prompt.history_dropped


async def test_no_summary_when_its_slot_does_not_fit_the_window():
    # The window leaves less history room than a summary needs: dropping turns is the only way to fit.
    async def summariser(old, max_tokens):
        return "A summary " * 100

    small = config(defaults=ModelConfig(context_tokens=600, max_tokens=450))
    prompt = await PromptBuilder(small, COUNTER, summariser=summariser).build(request(history=turns(10)))
    assert not prompt.history_summarised and prompt.history_dropped > 0
    assert prompt.prompt_tokens + 450 <= 600


async def test_failed_summary_falls_back_to_dropping():
    async def summariser(old, max_tokens):
        return None

    history = turns(10)
    cfg = config(budget=PromptBudget(history_tokens=400))
    prompt = await PromptBuilder(cfg, COUNTER, summariser=summariser).build(request(history=history))
    assert not prompt.history_summarised and prompt.history_dropped > 0
    assert all(not m["content"].startswith(SUMMARY_PREFIX) for m in prompt.messages)


async def test_sampling_resolution_request_over_model_over_defaults():
    cfg = config(defaults=ModelConfig(temperature=0.2, max_tokens=512),
                 models={"small": ModelConfig(temperature=0.0, max_tokens=64, stop=("END",))})
    builder = PromptBuilder(cfg, COUNTER)
    assert (await builder.build(request(model="small"))).sampling.max_tokens == 64
    s = (await builder.build(request(model="small", max_tokens=10, temperature=1.0))).sampling
    assert (s.max_tokens, s.temperature, s.stop) == (10, 1.0, ("END",))
    d = (await builder.build(request())).sampling
    assert (d.model, d.max_tokens, d.temperature) == ("extractive", 512, pytest.approx(0.2))


def test_a_limited_count_of_a_recurring_passage_is_its_cached_whole_count():
    """Packing counts each passage with a limit (what is left of the budget); passages recur across requests, so a
    passage short enough to cache is counted whole once and then read from the cache, never tokenised again."""
    text = " ".join(f"word{i}" for i in range(300))
    whole = COUNTER.count(text)
    assert whole > 300 and COUNTER.count(text, limit=10) == whole
    huge = "word " * 5000  # longer than the cache takes: counted only until past the limit
    assert 10 < COUNTER.count(huge, limit=10) < COUNTER.count(huge)
