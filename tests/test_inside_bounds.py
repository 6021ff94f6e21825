"""inside ("Inside the model"), continued: the charts, the bounds (the token cap, what a session
holds, close), the settings object, ties listed in the sampler's order, and the page's theme."""

from __future__ import annotations

import pytest
import torch

import qwen2
from inside import InsideSession, InsideSettings, inside_view
from inside.views import top_tokens, top_tokens_row
from profiling.memory import held_tensor_bytes
from qwen2.sampling import SamplingSettings
from tests.inside_fixtures import KINDS, PROMPT, SETTINGS, session_of


# ---- charts --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fused", "sliding"])
def test_charts_build_from_the_view(models, tokenizer, kind):
    from inside import charts

    session = session_of(models[kind], tokenizer, temperature=0.7, top_k=10, seed=0)
    view = session.start(PROMPT)
    figures = [charts.path_figure(view), charts.candidates_figure(view), charts.logit_lens_figure(view),
               charts.attention_figure(view, layer=1), charts.attention_figure(view, layer=1, mode="last"),
               charts.attention_figure(session.attention_layer(0), tokens=view["tokens"])]
    for fig in figures:
        assert fig.to_json()
    view = session.step()
    assert charts.attention_figure(view, layer=0).to_json()
    # without full maps the chart falls back to the last row
    long_view = session.view(full_maps=False)
    assert charts.attention_figure(long_view, layer=0).to_json()


# ---- bounds: the cap, what a session holds, close ------------------------------------------


def test_the_cap_refuses_a_long_prompt_and_a_step_past_it(models, tokenizer):
    model = models["fused"]
    session = session_of(model, tokenizer, max_tokens=12)
    assert session.max_tokens == 12
    with pytest.raises(qwen2.GenerationError) as err:
        session.start(list(range(5, 18)))  # 13 tokens
    message = str(err.value)
    assert "13 tokens" in message and "12" in message and "shorten" in message
    assert session.decode is None  # nothing was run
    long_text = "word " * 40
    with pytest.raises(qwen2.GenerationError, match=rf"{len(tokenizer.encode(long_text))} tokens.*cap of 12"):
        session.start(long_text)

    view = session.start(list(range(5, 15)))  # 10 tokens: two steps fit
    assert view["max_tokens"] == 12
    session.step()
    view = session.step()
    assert len(view["tokens"]) == 12
    seen = None if session.sampler.seen is None else session.sampler.seen.clone()
    with pytest.raises(qwen2.GenerationError) as err:
        session.step()
    message = str(err.value)
    assert "12" in message and "10 prompt + 2 stepped" in message and "shorter prompt" in message
    with pytest.raises(qwen2.GenerationError):
        session.step(3)  # a token picked by hand: refused alike, before anything changes
    assert len(session.ids) == 12 and session.view(full_maps=False)["step"] == 2
    if seen is not None:
        assert torch.equal(session.sampler.seen, seen)

    # the cap is at most the model's context; a bad cap is refused
    assert session_of(model, tokenizer, max_tokens=10**6).max_tokens == model.config.max_position_embeddings
    assert InsideSession(model, tokenizer).max_tokens == model.config.max_position_embeddings
    for bad in (0, -1, 2.5, "100", True):
        with pytest.raises(qwen2.GenerationError, match="max_tokens"):
            session_of(model, tokenizer, max_tokens=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_a_session_holds_only_its_kv_cache_as_the_prompt_grows(models, tokenizer, kind):
    """What a kept session holds grows with T by the KV cache's bytes per token at most: no per-layer
    activations of every position (q, k, the residual stream), no (L + 1, V) lens tensors. The
    session before the change held ~5x the KV cache's growth (the capture's (T, q|k|v) and (T, D)
    outputs, q/k of every position)."""
    from qwen2.cache import kv_bytes_per_token

    model = models[kind]
    per_token = kv_bytes_per_token(model.config, model.dtype)

    def held(n: int, steps: int) -> tuple[int, int]:
        session = session_of(model, tokenizer, temperature=0.7, repetition_penalty=1.2, seed=0)
        session.start([(7 * i) % 400 + 50 for i in range(n)])
        for _ in range(steps):
            session.step()
        return held_tensor_bytes(session, skip=(model, tokenizer)), session.decode.cache.allocated_bytes

    for steps in (0, 1):
        small, small_cache = held(20, steps)
        big, big_cache = held(200, steps)
        assert big - small <= (200 - 20) * per_token, (steps, big, small)
        # beyond the KV cache, nothing grows with T (q of every position is kept only up to full_map_max)
        assert big - big_cache <= small - small_cache, (steps, big - big_cache, small - small_cache)
        # and that rest is small: a few (V,) rows and the (L + 1, D) residual rows
        c = model.config
        assert big - big_cache <= 8 * c.vocab_size * 4 + 4 * (c.num_hidden_layers + 1) * c.hidden_size * 4


def test_the_kv_cache_is_sized_by_the_cap(models, tokenizer):
    model = models["fused"]
    session = session_of(model, tokenizer, max_tokens=40)
    session.start(list(range(5, 35)))
    assert session.decode.cache.max_len == 40
    assert session.view()["kv_cache"]["allocated_tokens"] == 40


def test_close_lets_the_kv_cache_go(models, tokenizer):
    import gc
    import weakref

    model = models["fused"]
    session = InsideSession(model, tokenizer)
    session.start(PROMPT)
    session.step()
    refs = [weakref.ref(session.decode.cache.k[0]), weakref.ref(session.decode.cache.v[-1]),
            weakref.ref(session.q_all[0]), weakref.ref(session.latest.lens_rows)]
    session.close()
    gc.collect()
    assert all(r() is None for r in refs)
    assert held_tensor_bytes(session, skip=(model, tokenizer)) == 0
    for call in (session.step, session.view, lambda: session.attention_probs(0)):
        with pytest.raises(qwen2.GenerationError, match="closed"):
            call()
    session.close()  # twice: a no-op
    # started again, it works as a fresh one
    assert session.start(PROMPT)["chosen"] == InsideSession(model, tokenizer).start(PROMPT)["chosen"]

    with InsideSession(model, tokenizer) as s:
        s.start(PROMPT)
        ref = weakref.ref(s.decode.cache.k[0])
    gc.collect()
    assert ref() is None and s.decode is None

    view = inside_view(model, tokenizer, PROMPT, steps=1)  # the one-call helper closes its session
    assert view["step"] == 1


def test_full_maps_end_past_full_map_max_and_the_last_row_stays_right(models, tokenizer):
    model = models["sliding"]
    ids = list(range(5, 12))  # 7 tokens, full_map_max 8: the second step crosses it
    session = session_of(model, tokenizer, full_map_max=8)
    session.start(ids)
    view = session.step()
    assert all(e["full"] is not None for e in view["attention"]["layers"])  # 8 tokens: still full
    view = session.step()
    assert all(e["full"] is None for e in view["attention"]["layers"])  # 9 tokens: the last row only
    with pytest.raises(qwen2.GenerationError, match="full_map_max"):
        session.attention_probs(0, last_only=False)
    fresh = session_of(model, tokenizer, full_map_max=8)
    fresh_view = fresh.start([t["id"] for t in view["tokens"]])
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(session.attention_probs(layer)[0], fresh.attention_probs(layer)[0],
                                   rtol=1e-4, atol=1e-6)
        assert session.attention_probs(layer)[1].tolist() == fresh.attention_probs(layer)[1].tolist()
    assert view["logit_lens"]["top_ids"] == fresh_view["logit_lens"]["top_ids"]


def test_settings_object_or_keywords(models, tokenizer):
    model = models["fused"]
    ids = tokenizer.encode(PROMPT)
    by_keywords = session_of(model, tokenizer, seed=3, **SETTINGS)
    by_object = InsideSession(model, tokenizer, InsideSettings(sampling=SamplingSettings(**SETTINGS), seed=3))
    assert by_object.settings.sampling == by_keywords.settings.sampling == SamplingSettings(**SETTINGS)
    assert by_object.settings == by_keywords.settings
    a, b = by_keywords.start(ids), by_object.start(ids)
    assert a["chosen"] == b["chosen"] and a["candidates"] == b["candidates"]
    assert by_keywords.step()["chosen"] == by_object.step()["chosen"]
    assert InsideSession(model, tokenizer).settings.sampling == SamplingSettings()
    with pytest.raises(qwen2.GenerationError, match="not both"):
        InsideSettings.of(sampling=SamplingSettings(), temperature=0.5)
    with pytest.raises(qwen2.GenerationError, match="SamplingSettings"):
        InsideSettings(sampling={"temperature": 0.5})
    with pytest.raises(qwen2.GenerationError, match="InsideSettings"):
        InsideSession(model, tokenizer, settings={"temperature": 0.5})
    with pytest.raises(qwen2.GenerationError, match="not both"):
        inside_view(model, tokenizer, PROMPT, settings=InsideSettings(), temperature=0.5)


@pytest.mark.parametrize("bad", [dict(candidates=0), dict(lens_top=True), dict(full_map_max=-1), dict(seed=-1),
                                 dict(seed=2.5), dict(colour="red")])
def test_bad_inside_settings_are_refused_naming_them(bad):
    name = next(iter(bad))
    with pytest.raises(qwen2.GenerationError, match=name):
        InsideSettings.of(**bad)


def test_inside_settings_are_values():
    """Frozen and compared by value (a list of layers is kept as a tuple), so a session's settings
    cannot change under it."""
    a, b = InsideSettings.of(full_maps=[0, 1], seed=1), InsideSettings.of(full_maps=(0, 1), seed=1)
    assert a == b and hash(a) == hash(b) and a.full_maps == (0, 1)
    with pytest.raises(AttributeError):
        a.seed = 2
    assert InsideSettings(max_tokens=100).cap(64) == 64 and InsideSettings().cap(64) == 64


def test_a_picked_token_is_what_the_penalty_sees(models, tokenizer):
    """Feeding a token other than the chosen one: the repetition penalty marks the token fed, not the
    draw, so the next candidates equal a fresh session's on the same text."""
    model = models["fused"]
    ids = tokenizer.encode(PROMPT)
    options = dict(temperature=0.7, repetition_penalty=1.5, seed=0)
    session = session_of(model, tokenizer, **options)
    session.start(ids)
    picked = next(t for t in range(300, 400) if t != session.chosen and t not in ids)
    session.step(picked)
    fresh = session_of(model, tokenizer, **options)
    fresh.start(ids + [picked])
    for (name, got), (_, want) in zip(session.stage_probs(), fresh.stage_probs()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


# ---- ties: listed in the order the sampler breaks them -------------------------------------


def test_top_tokens_break_ties_as_the_sampler_does():
    row = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.3])
    assert top_tokens_row(row, 2)[0].tolist() == [1, 2]  # lower ids first: argmax's pick leads
    assert top_tokens_row(row, 2, first=4)[0].tolist() == [4, 1]  # the drawn token ahead of its equals
    assert top_tokens_row(row, 5, first=3)[0].tolist() == [1, 2, 4, 3, 0]  # not tied at the top: no move
    assert top_tokens_row(torch.tensor([0.0, 0.5, 0.0, 0.5]), 3, positive=True)[0].tolist() == [1, 3]
    torch.manual_seed(0)
    probs = torch.randint(0, 4, (50, 30)).float()  # many ties
    ids, values = top_tokens(probs, 3)
    assert ids[:, 0].tolist() == probs.argmax(-1).tolist()
    assert torch.equal(values, probs.gather(1, ids)) and (values[:, :-1] >= values[:, 1:]).all()


@pytest.fixture
def tied_model(tiny_model_dir, tokenizer):
    """A model whose next token after PROMPT is an exact tie: two LM-head rows made equal and far
    above the rest (a fresh copy: the rows changed are not the shared fixtures')."""
    model = qwen2.load_model(tiny_model_dir, dtype="float32", fuse=True)
    ids = tokenizer.encode(PROMPT)
    session = InsideSession(model, tokenizer)
    session.start(ids)
    with torch.inference_mode():
        direction = model.model.norm(session.latest.lens_rows[-1])
        low, high = [t for t in range(3, model.config.vocab_size) if t not in ids][:2]
        model.lm_head.weight[low] = model.lm_head.weight[high] = 8 * direction / direction.norm()
    return model, low, high


@pytest.mark.parametrize("sampled", [False, True])
def test_the_lens_and_the_candidates_lead_with_the_chosen_token_in_a_tie(tied_model, tokenizer, sampled):
    model, low, high = tied_model
    chosen = set()
    for seed in range(40):
        session = session_of(model, tokenizer, **(dict(temperature=1.0, seed=seed) if sampled else {}))
        view = session.start(PROMPT)
        last = session.lens_logits[-1]
        assert last[low] == last[high] == last.max() and session.logits[0, low] == session.logits[0, high]
        token = view["chosen"]["id"]
        assert token in (low, high)
        chosen.add(token)
        lens = view["logit_lens"]
        assert lens["top_ids"][-1][:2] == [token, high if token == low else low]
        assert lens["target"]["ranks"][-1] == 1
        assert view["candidates"]["tokens"][0]["id"] == token
        if not sampled:
            assert token == low  # greedy: argmax, the lower id
            break
        if chosen == {low, high}:
            break
    assert chosen == ({low, high} if sampled else {low})


# ---- the page's theme ----------------------------------------------------------------------


def test_charts_follow_the_theme(models, tokenizer):
    from inside import charts
    from profiling.chart_style import THEMES
    from studio.inside import Inside

    session = session_of(models["fused"], tokenizer, temperature=0.7, seed=0)
    view = session.start(PROMPT)
    draw = [lambda v, **k: charts.path_figure(v, **k), lambda v, **k: charts.candidates_figure(v, **k),
            lambda v, **k: charts.logit_lens_figure(v, **k), lambda v, **k: charts.attention_figure(v, 0, **k),
            lambda v, **k: charts.attention_figure(v, 1, mode="last", **k)]
    for theme in ("light", "dark"):
        colors = THEMES[theme]
        for fig in [fn(view, theme=theme) for fn in draw] + Inside.figures(view, 0, theme)[1:5]:
            layout = fig.layout
            assert layout.font.color == colors["ink"] and layout.title.subtitle.font.color == colors["muted"]
            assert layout.paper_bgcolor == "rgba(0,0,0,0)"  # the page's own colour shows through
            assert layout.template.layout.paper_bgcolor == THEME_PAPER[theme]
        table = charts.path_figure(view, theme=theme).data[0]
        assert table.header.font.color == table.cells.font.color == colors["ink"]  # a table's own text
    assert charts.path_figure(view).layout.font.color == THEMES["light"]["ink"]  # the default
    assert Inside.figures(view, 0, "no such theme")[1].layout.font.color == THEMES["light"]["ink"]
    with pytest.raises(ValueError, match="theme"):
        charts.logit_lens_figure(view, theme="sepia")


THEME_PAPER = {"light": "white", "dark": "rgb(17,17,17)"}  # plotly_white's and plotly_dark's own
