"""Plain functions of the text generator (reference §4.1), no Dagster, no DB."""

import pytest

from flux_dagster.db.models import SystemAiModel
from flux_dagster.errors import UserConfigError
from flux_dagster.nodes import text_generator as tg


def model(**kw):
    base = dict(modelName="m", aiCompany="openai", maxOutputToken=1000, supportsReasoning=False,
                reasoningAlwaysOn=False, active=True)
    return SystemAiModel(**{**base, **kw})


@pytest.mark.parametrize("ai_system,field", sorted(tg.MODEL_FIELD_BY_AI_SYSTEM.items()))
def test_model_field_follows_ai_system(ai_system, field):
    assert tg.resolve_model({"AiSystem": ai_system, field: " the-model "}) == (ai_system, "the-model")


def test_unknown_provider_and_missing_model_are_user_errors():
    with pytest.raises(UserConfigError, match="AiSystem"):
        tg.resolve_model({"AiSystem": "mystery", "aiModel": "x"})
    with pytest.raises(UserConfigError, match="anthropicModel"):
        tg.resolve_model({"AiSystem": "anthropicai", "aiModel": "x"})


def test_system_prompt_sections_in_order_data_first_and_empty_skipped():
    prompt = tg.build_system_prompt({
        "persona": "P", "instructionData": [{"text": "I-edge"}], "instruction": "I",
        "promptData": [{"text": "T1"}, {"text": ""}, {"text": "T2"}], "prompt": "T",
    })
    assert prompt == "# Persona\nP\n\n# Instructions\nI-edge\nI\n\n# Task\nT1\nT2\nT"


def test_empty_fields_give_the_default_prompt():
    assert tg.build_system_prompt({"persona": "", "promptData": []}) == tg.DEFAULT_SYSTEM_PROMPT


MEMORIES = [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four five"},
            {"role": "user", "content": "six seven eight"}]


@pytest.mark.parametrize("data,expected", [
    ({}, MEMORIES),
    ({"selectedType": "Load All Entries"}, MEMORIES),
    ({"selectedType": "Load First X Entries", "selectedIndex": 2}, MEMORIES[:2]),
    ({"selectedType": "Load Last X Entries", "selectedIndex": "1"}, MEMORIES[-1:]),
    ({"selectedType": "Load Last X Entries", "selectedIndex": 0}, []),
    ({"selectedType": "Load First X Words", "selectedNumber": 4},
     [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four"}]),
    ({"selectedType": "Load Last X Words", "selectedNumber": 4},
     [{"role": "assistant", "content": "five"}, {"role": "user", "content": "six seven eight"}]),
])
def test_memory_filters(data, expected):
    assert tg.filter_memories(MEMORIES, data) == expected


def test_messages_use_the_session_memory_and_end_with_a_user_turn():
    data = {"memory": True, "userSessionsChat": [
        {"sessionId": "other", "memories": [{"role": "user", "content": "not mine"}]},
        {"sessionId": "s1", "memories": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]}
    messages = tg.build_messages(data, "s1")
    assert messages[:2] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert messages[-1] == {"role": "user", "content": tg.FALLBACK_USER_MESSAGE}
    assert tg.build_messages({}, None) == [{"role": "user", "content": tg.FALLBACK_USER_MESSAGE}]
    with pytest.raises(UserConfigError):
        tg.build_messages({"memory": True}, None)


def test_provider_options_per_company():
    opts = tg.build_provider_options("openai", {"aiTokens": "300", "aiTemperature": 0.2, "aiPp": 0.9, "aiEffort": "low"}, model())
    assert (opts.max_tokens, opts.temperature, opts.top_p, opts.reasoning) == (300, 0.2, 0.9, False)
    opts = tg.build_provider_options("anthropic", {"anthropicToken": 500, "anthropicTopK": 5}, model(aiCompany="anthropic"))
    assert (opts.max_tokens, opts.top_k) == (500, 5)
    opts = tg.build_provider_options("groq", {"groqMaxTokens": 10, "seed": 7, "groqStop": ["END"]}, model())
    assert (opts.max_tokens, opts.seed, opts.stop) == (10, 7, ("END",))
    opts = tg.build_provider_options("perplexity", {"perplexityTokens": 20, "search_context_size": "high"}, model())
    assert (opts.max_tokens, opts.search_context_size) == (20, "high")


def test_reasoning_drops_sampling_and_defaults_max_tokens_to_the_model_maximum():
    data = {"aiTemperature": 0.7, "aiPp": 0.5, "reasoning": True, "aiEffort": "high"}
    opts = tg.build_provider_options("openai", data, model(supportsReasoning=True, maxOutputToken=9000))
    assert (opts.temperature, opts.top_p, opts.max_tokens, opts.reasoning, opts.reasoning_effort) == (None, None, 9000, True, "high")
    # a model without reasoning support ignores the flag
    opts = tg.build_provider_options("openai", data, model())
    assert (opts.temperature, opts.reasoning) == (0.7, False)
    # reasoningAlwaysOn needs no flag
    assert tg.build_provider_options("openai", {}, model(supportsReasoning=True, reasoningAlwaysOn=True)).reasoning


def test_auto_token_uses_the_model_maximum():
    assert tg.build_provider_options("openai", {"aiTokens": 10, "autoToken": True}, model(maxOutputToken=777)).max_tokens == 777


def test_anthropic_display_names_map_to_api_ids():
    assert tg.api_model_id("anthropic", "claude-4-5-sonnet") == "claude-sonnet-4-5-20250929"
    assert tg.api_model_id("openai", "claude-4-5-sonnet") == "claude-4-5-sonnet"
