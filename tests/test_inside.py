"""inside ("Inside the model"): every number it shows checked against the model itself --
shapes against the config, the logit lens's last layer against the model's logits, the attention
maps against the eager backend's probabilities, the candidates against qwen2.sampling, a step
against a full forward -- on fused and unfused models and a sliding-window one."""


from __future__ import annotations

import json

import pytest
import torch

import qwen2
from inside import InsideSession, inside_view, parameter_counts
from qwen2 import model as model_module
from qwen2.sampling import PROCESSORS, SamplingSettings, apply_min_p, apply_repetition_penalty, apply_top_k, \
    apply_top_p, process_logits, processor_stages
from tests.inside_fixtures import KINDS, PROMPT, SETTINGS, full_logits, session_of


# ---- shapes and parameters -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_path_shapes_equal_the_config(models, tokenizer, kind):
    model = models[kind]
    c = model.config
    session = InsideSession(model, tokenizer)
    view = session.start(PROMPT)
    T = len(tokenizer.encode(PROMPT))
    H, Hkv, hd, D, I, V = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size,
                           c.intermediate_size, c.vocab_size)
    expected = {"tokens": [T], "embedding": [T, D], "input_layernorm": [T, D], "q_proj": [T, H * hd],
                "k_proj": [T, Hkv * hd], "v_proj": [T, Hkv * hd], "rope": [T, hd], "attention": [T, H * hd],
                "o_proj": [T, D], "attn_residual": [T, D], "post_attention_layernorm": [T, D],
                "gate_proj": [T, I], "up_proj": [T, I], "swiglu": [T, I], "down_proj": [T, D],
                "layer_out": [T, D], "final_norm": [T, D], "last_row": [D], "lm_head": [V], "softmax": [V],
                "chosen": [1]}
    path = {s["key"]: s for s in view["path"]}
    assert list(path) == list(expected)
    for key, shape in expected.items():
        assert path[key]["shape"] == shape, key
        assert path[key]["ok"], key
    # every layer's captured shapes were checked, not only layer 0's
    for (name, layer), shape in session.latest.shapes.items():
        if layer is not None and name in expected:
            assert shape == expected[name], (name, layer)
    assert view["model"]["fused"] is (kind != "unfused")

    # a decode step: one new token
    view = session.step()
    path = {s["key"]: s for s in view["path"]}
    assert path["q_proj"]["shape"] == [1, H * hd] and path["lm_head"]["shape"] == [V]
    assert all(s["ok"] for s in view["path"])
    assert view["phase"] == "decode" and view["step"] == 1


@pytest.mark.parametrize("kind", ["fused", "unfused"])
def test_parameter_counts_add_up_to_the_model(models, kind):
    model = models[kind]
    counts = parameter_counts(model.config)
    unique = {id(p): p.numel() for p in model.parameters()}  # the tied LM head counted once
    assert counts["total"] == sum(unique.values())
    layer = model.model.layers[0]
    assert counts["layer"] == sum(p.numel() for p in layer.parameters())
    assert counts["q_proj"] + counts["k_proj"] + counts["v_proj"] == sum(
        p.numel() for p in layer.self_attn.parameters()) - layer.self_attn.o_proj.weight.numel()


def test_parameter_counts_of_official_shapes():
    from qwen2.config import official_config

    assert parameter_counts(official_config("Qwen/Qwen2-0.5B-Instruct"))["total"] == 494_032_768
    big = parameter_counts(official_config("Qwen/Qwen2-72B-Instruct"))["total"]
    assert 72e9 < big < 73e9


def test_kv_cache_bytes(models, tokenizer):
    model = models["fused"]
    c = model.config
    view = InsideSession(model, tokenizer).start(PROMPT)
    kv = view["kv_cache"]
    T = len(view["tokens"])
    assert kv["bytes_per_token_per_layer"] == 2 * c.num_key_value_heads * c.head_dim * 4
    assert kv["bytes"] == kv["bytes_per_token_per_layer"] * c.num_hidden_layers * T
    assert kv["layer_shape"] == [c.num_key_value_heads, T, c.head_dim]


# ---- logit lens ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logit_lens_last_layer_equals_the_model_logits(models, tokenizer, kind):
    model = models[kind]
    ids = tokenizer.encode(PROMPT)
    session = session_of(model, tokenizer, lens_top=5)
    view = session.start(ids)
    want = full_logits(model, ids)
    torch.testing.assert_close(session.lens_logits[-1], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(session.logits[0], want, rtol=1e-5, atol=1e-5)
    lens = view["logit_lens"]
    L = model.config.num_hidden_layers
    assert lens["rows"] == ["embedding"] + [f"layer {i}" for i in range(L)]
    assert len(lens["top_ids"]) == L + 1 and all(len(r) == 5 for r in lens["top_ids"])
    assert lens["top_ids"][-1] == want.topk(5).indices.tolist()
    probs = want.softmax(-1)
    assert lens["top_probs"][-1] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-5)
    assert all(a >= b for row in lens["top_probs"] for a, b in zip(row, row[1:]))
    # the target row: the chosen token's probability and rank under each layer
    assert lens["target"]["ranks"][-1] == 1  # greedy: the last layer's favourite
    assert lens["target"]["probs"][-1] == pytest.approx(float(probs.max()), abs=1e-5)


@torch.inference_mode()
def test_logit_lens_middle_rows_are_the_residual_stream(models, tokenizer):
    """Row i + 1 = lm_head(norm(output of layer i)) at the last position, from a plain forward."""
    model = models["unfused"]
    ids = tokenizer.encode(PROMPT)
    session = InsideSession(model, tokenizer)
    session.start(ids)
    outs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outs.append(out[0, -1].clone()))
               for layer in model.model.layers]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    emb = model.model.embed_tokens(torch.tensor([ids[-1]]))[0]
    for row, h in enumerate([emb] + outs):
        want = model.lm_head(model.model.norm(h)).float()
        torch.testing.assert_close(session.lens_logits[row], want, rtol=1e-5, atol=1e-5)


# ---- attention -----------------------------------------------------------------------------


class EagerProbs:
    """Wraps the eager backend to record its attention probabilities: eager_attention's own code
    run on the q, k and mask the model passes, with v = identity, gives back exactly its probs."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, mask, scale):
        S = k.shape[2]
        eye = torch.eye(S, dtype=q.dtype).expand(k.shape[0], k.shape[1], S, S)
        self.calls.append(model_module.eager_attention(q, k, eye, mask, scale)[0].clone())  # (H, T, S)
        return model_module.eager_attention(q, k, v, mask, scale)


@pytest.fixture
def eager_probs(monkeypatch):
    recorder = EagerProbs()
    monkeypatch.setitem(model_module.ATTENTION_BACKENDS, "eager", recorder)
    return recorder


@pytest.mark.parametrize("kind", KINDS)
def test_attention_equals_the_eager_backend(models, tokenizer, eager_probs, kind):
    model = models[kind]
    L = model.config.num_hidden_layers
    model.set_attention_backend("eager")
    try:
        session = InsideSession(model, tokenizer)
        view = session.start(PROMPT)
        prefill = eager_probs.calls[-L:]
        eager_probs.calls.clear()
        T = len(view["tokens"])
        for layer in range(L):
            full, visible = session.attention_probs(layer, last_only=False)
            assert full.shape == (model.config.num_attention_heads, T, T)
            torch.testing.assert_close(full, prefill[layer], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(full.sum(-1), torch.ones_like(full.sum(-1)))
            assert not full[:, ~visible].any()  # nothing outside the mask
            entry = view["attention"]["layers"][layer]
            torch.testing.assert_close(torch.tensor(entry["full"]), full, rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.tensor(entry["last_row"]), full[:, -1], rtol=0, atol=1e-5)

        for _ in range(2):  # decode steps: the new token's row over the cache
            view = session.step()
            for layer in range(L):
                last, _ = session.attention_probs(layer, last_only=True)
                torch.testing.assert_close(last, eager_probs.calls[layer], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(last.sum(-1), torch.ones_like(last.sum(-1)))
            eager_probs.calls.clear()
    finally:
        model.set_attention_backend("sdpa")


def test_sliding_window_layers_show_their_window(models, tokenizer):
    model = models["sliding"]
    window = model.config.sliding_window
    session = InsideSession(model, tokenizer)
    view = session.start(PROMPT)
    T = len(view["tokens"])
    assert T > window
    full_layer, sliding_layer = view["attention"]["layers"]
    assert full_layer["type"] == "full_attention" and full_layer["window"] is None
    assert sliding_layer["type"] == "sliding_attention" and sliding_layer["window"] == window
    assert sum(full_layer["last_visible"]) == T
    assert sliding_layer["last_visible"] == [False] * (T - window) + [True] * window
    for head in sliding_layer["last_row"]:
        assert all(p == 0 for p in head[:T - window]) and sum(head) == pytest.approx(1, abs=1e-4)
    visible = torch.tensor(sliding_layer["full_visible"])
    assert visible.sum(-1).tolist() == [min(i + 1, window) for i in range(T)]


def test_query_heads_are_grouped_under_their_kv_head(models, tokenizer):
    model = models["fused"]
    c = model.config
    view = InsideSession(model, tokenizer).start(PROMPT)
    groups = c.num_attention_heads // c.num_key_value_heads
    assert view["attention"]["groups"] == groups
    assert view["attention"]["layers"][0]["kv_head_of"] == [h // groups for h in range(c.num_attention_heads)]


def test_full_maps_only_for_short_prompts(models, tokenizer):
    model = models["fused"]
    session = session_of(model, tokenizer, full_map_max=8)
    view = session.start(list(range(5, 15)))  # 10 tokens > 8
    assert all(e["full"] is None for e in view["attention"]["layers"])
    assert all(len(e["last_row"][0]) == 10 for e in view["attention"]["layers"])
    session = InsideSession(model, tokenizer)
    session.start(list(range(5, 15)))
    assert session.view(full_maps=False)["attention"]["layers"][0]["full"] is None
    picked = session.view(full_maps=[1])["attention"]["layers"]
    assert picked[0]["full"] is None and picked[1]["full"] is not None
    assert session.attention_layer(0)["full"] is not None


# ---- candidates and the sampling processors ------------------------------------------------




def test_processor_stages_follow_process_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 3
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen[:, :10] = True
    settings = SamplingSettings(**SETTINGS)
    stages = processor_stages(logits, settings, seen)
    assert [name for name, _ in stages] == ["logits", *PROCESSORS]
    x = logits
    for (name, got), fn in zip(stages, [lambda t: t,
                                        lambda t: apply_repetition_penalty(t, seen, 1.3),
                                        lambda t: t / 0.8,
                                        lambda t: apply_top_k(t, 20),
                                        lambda t: apply_top_p(t, 0.9),
                                        lambda t: apply_min_p(t, 0.05)]):
        x = fn(x)
        torch.testing.assert_close(got, x, msg=name)
    torch.testing.assert_close(stages[-1][1], process_logits(logits, settings, seen))
    greedy = processor_stages(logits, SamplingSettings(repetition_penalty=1.3), seen)
    assert [name for name, _ in greedy] == ["logits", "repetition_penalty"]
    torch.testing.assert_close(greedy[-1][1], process_logits(logits, SamplingSettings(repetition_penalty=1.3), seen))


def test_candidates_after_processors_equal_sampling(models, tokenizer):
    model = models["fused"]
    ids = tokenizer.encode(PROMPT)
    session = session_of(model, tokenizer, seed=0, candidates=8, **SETTINGS)
    view = session.start(ids)
    settings = SamplingSettings(**SETTINGS)
    logits = full_logits(model, ids)[None]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, ids] = True
    want = process_logits(logits, settings, seen).softmax(-1)[0]
    final = session.stage_probs()[-1][1]
    torch.testing.assert_close(final, want, rtol=1e-5, atol=1e-6)
    cand = view["candidates"]
    assert [s["name"] for s in cand["stages"]] == ["logits", *PROCESSORS]
    assert all(s["active"] for s in cand["stages"])
    token_ids = [t["id"] for t in cand["tokens"]]
    assert len(token_ids) == 8 == len(set(token_ids))
    assert cand["stages"][-1]["probs"] == pytest.approx(want[token_ids].tolist(), abs=1e-5)
    assert cand["stages"][0]["probs"] == pytest.approx(logits.softmax(-1)[0, token_ids].tolist(), abs=1e-5)
    assert cand["stages"][-1]["kept"] == int((want > 0).sum()) <= 20
    for stage in cand["stages"]:
        assert stage["other"] == pytest.approx(1 - sum(stage["probs"]), abs=1e-4)
    assert view["chosen"]["prob"] == pytest.approx(float(want[view["chosen"]["id"]]), abs=1e-5)
    assert want[view["chosen"]["id"]] > 0


def test_greedy_candidates_end_in_the_argmax(models, tokenizer):
    model = models["fused"]
    ids = tokenizer.encode(PROMPT)
    view = InsideSession(model, tokenizer).start(ids)
    stages = view["candidates"]["stages"]
    assert [s["name"] for s in stages] == ["logits", "repetition_penalty", "greedy"]
    assert [s["active"] for s in stages] == [True, False, True]
    assert view["chosen"]["id"] == int(full_logits(model, ids).argmax()) == view["candidates"]["tokens"][0]["id"]
    assert stages[-1]["probs"][0] == 1.0 and view["chosen"]["prob"] == 1.0


@pytest.mark.parametrize("sampling", [{}, dict(SETTINGS, seed=3)])
def test_chosen_tokens_are_what_generate_yields(models, tokenizer, sampling):
    model = models["fused"]
    ids = tokenizer.encode(PROMPT)
    want = list(qwen2.generate(model, torch.tensor([ids]), max_new_tokens=5, stop_token_ids=[], **sampling))
    session = session_of(model, tokenizer, **sampling)
    got = [session.start(ids)["chosen"]["id"]]
    for _ in range(4):
        got.append(session.step()["chosen"]["id"])
    assert got == want


# ---- stepping ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_a_full_forward_on_prompt_plus_token(models, tokenizer, kind):
    model = models[kind]
    ids = tokenizer.encode(PROMPT)
    session = InsideSession(model, tokenizer)
    session.start(ids)
    for token in (None, 7):  # the chosen token, then one the user picked
        view = session.step(token)
        fed = view["tokens"][-1]["id"]
        ids = ids + [fed]
        assert [t["id"] for t in view["tokens"]] == ids and view["tokens"][-1]["generated"]
        want = full_logits(model, ids)
        torch.testing.assert_close(session.logits[0], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(session.lens_logits[-1], want, rtol=1e-4, atol=1e-5)
        fresh = InsideSession(model, tokenizer)
        fresh_view = fresh.start(ids)
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(session.attention_probs(layer, last_only=False)[0],
                                       fresh.attention_probs(layer, last_only=False)[0], rtol=1e-4, atol=1e-6)
        assert view["logit_lens"]["top_ids"] == fresh_view["logit_lens"]["top_ids"]
    assert fed == 7


def test_one_cache_for_the_cap_serves_every_step_up_to_it(models, tokenizer):
    """The KV cache is allocated once, for the cap: stepping to the cap never builds another (no
    regrowth, no re-prefill), and the last step still equals a full forward."""
    model = models["fused"]
    ids = tokenizer.encode(PROMPT)
    cap = len(ids) + 3
    session = session_of(model, tokenizer, max_tokens=cap)
    session.start(ids)
    cache = session.decode.cache
    assert cache.max_len == cap
    for _ in range(3):
        view = session.step()
        assert session.decode.cache is cache
    ids = [t["id"] for t in view["tokens"]]
    assert len(ids) == cap == cache.length
    torch.testing.assert_close(session.logits[0], full_logits(model, ids), rtol=1e-4, atol=1e-5)


def test_the_view_is_json_and_names_random_weights(tokenizer, tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32", random_weights=True)
    view = inside_view(model, tokenizer, PROMPT, steps=2, temperature=0.7, top_p=0.8, seed=1)
    again = json.loads(json.dumps(view))
    assert again["notice"] and "random" in again["notice"].lower()
    assert again["step"] == 2 and again["phase"] == "decode"
    assert again["model"]["parameters"] == parameter_counts(model.config)["total"]
    assert set(again["timing"]) == {"forward_s", "views_s"}
    assert all(isinstance(t["text"], str) and t["text"] for t in again["tokens"])


@pytest.mark.parametrize("options", [dict(dtype="bfloat16"), dict(dtype="bfloat16", quantize="int8", fuse=False)])
def test_other_dtypes_and_int8(tiny_model_dir, tokenizer, options):
    model = qwen2.load_model(tiny_model_dir, **options)
    session = session_of(model, tokenizer, temperature=0.5, seed=0)
    session.start(PROMPT)
    view = session.step()
    assert all(s["ok"] for s in view["path"])
    want = full_logits(model, [t["id"] for t in view["tokens"]])
    torch.testing.assert_close(session.lens_logits[-1], want, rtol=2e-2, atol=2e-2)
    probs, _ = session.attention_probs(0, last_only=False)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_bad_input_is_refused(models, tokenizer):
    session = InsideSession(models["fused"], tokenizer)
    with pytest.raises(qwen2.GenerationError):
        session.step()
    with pytest.raises(qwen2.GenerationError):
        session.start([])
    with pytest.raises(qwen2.GenerationError):
        session.start([models["fused"].config.vocab_size])
    with pytest.raises(qwen2.GenerationError):
        InsideSession(models["fused"]).start("text without a tokenizer")
    with pytest.raises(qwen2.GenerationError):
        session_of(models["fused"], tokenizer, top_p=0)
