import pytest
import torch
from transformers import GenerationConfig

from effopd.rollout import ENGINES, eos_ids, generate, response_mask, top_p_filter

#: The engines tested case by case; lean-compiled runs the lean loop (its own test below compares
#: the two), and its compile takes tens of seconds per model.
EAGER_ENGINES = sorted(set(ENGINES) - {"lean-compiled"})
from effopd.scoring import score, token_logprobs
from effopd.utils import isolated_rng

PROMPTS = ["12+3=", "45+67-8=", "9=", "10-2+33-4="]  # different lengths: left padding matters


def test_response_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert response_mask(ids, eos_token_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("backend", EAGER_ENGINES)
def test_generate_shapes_masks_and_texts(tiny_student, backend):
    tok, model = tiny_student
    ro = generate(model, tok, PROMPTS, max_new_tokens=12, keep_logprobs=True, backend=backend)
    B, T = ro.response_ids_BT.shape
    assert B == 4 and T <= 12 and ro.logp_BT.shape == (B, T)
    assert (ro.logp_BT <= 0).all() and (ro.logp_BT[ro.response_mask_BT == 1] < 0).all()
    # padding after EOS is pad and has zero logprob
    assert (ro.response_ids_BT[ro.response_mask_BT == 0] == tok.pad_token_id).all()
    assert (ro.logp_BT[ro.response_mask_BT == 0] == 0).all()
    assert ro.texts == tok.batch_decode(ro.response_ids_BT, skip_special_tokens=True)
    assert ro.prompt_ids_BP[0, 0] == tok.pad_token_id  # short prompt is left-padded


@pytest.mark.parametrize("backend", EAGER_ENGINES)
def test_scoring_matches_sampling_logprobs(tiny_student, backend):
    """The trainer's forward pass must see exactly what the sampler saw: same positions despite
    left padding, same next-token distribution."""
    tok, model = tiny_student
    for temperature in (1.0, 0.7):
        ro = generate(model, tok, PROMPTS * 3, max_new_tokens=10, temperature=temperature, keep_logprobs=True, backend=backend)
        logp = score(model, ro, temperature=temperature)
        torch.testing.assert_close(logp, ro.logp_BT, atol=1e-4, rtol=0)


def test_chunked_scoring_equals_unchunked_and_grad_flows(tiny_student):
    tok, model = tiny_student
    ro = generate(model, tok, PROMPTS * 2, max_new_tokens=8)
    full = score(model, ro)
    torch.testing.assert_close(score(model, ro, chunk_size=3), full, atol=1e-6, rtol=0)
    logp = token_logprobs(model, ro)
    assert logp.requires_grad
    logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("backend", EAGER_ENGINES)
def test_batched_generation_equals_one_batch_greedy(tiny_student, backend):
    tok, model = tiny_student
    a = generate(model, tok, PROMPTS, max_new_tokens=8, greedy=True, backend=backend)
    b = generate(model, tok, PROMPTS, max_new_tokens=8, greedy=True, batch_size=3, backend=backend)
    assert a.texts == b.texts


def test_isolated_rng_leaves_global_stream_untouched(tiny_student):
    tok, model = tiny_student
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with isolated_rng(99):
        generate(model, tok, PROMPTS, max_new_tokens=6)
    assert torch.equal(torch.rand(3), expected)
    with isolated_rng(5):
        x = generate(model, tok, PROMPTS, max_new_tokens=6).texts
    with isolated_rng(5):
        y = generate(model, tok, PROMPTS, max_new_tokens=6).texts
    assert x == y


# ---- end-of-sequence ids ---------------------------------------------------------------------------


def test_response_mask_stops_at_the_first_of_several_eos_ids():
    ids = torch.tensor([[5, 6, 3, 7, 2], [5, 2, 3, 5, 5], [5, 5, 5, 5, 5], [3, 2, 0, 0, 0]])
    assert response_mask(ids, [2, 3]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert response_mask(ids, [3]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="eos_token_id=\\[\\] holds no token id"):
        response_mask(ids, [])


def test_eos_ids_unites_the_generation_config_and_the_tokenizer(tiny_student):
    tok, model = tiny_student
    other = tok.convert_tokens_to_ids("7")
    model.generation_config.eos_token_id = [tok.eos_token_id, other]
    assert eos_ids(model, tok) == [tok.eos_token_id, other]
    model.generation_config.eos_token_id = other
    assert eos_ids(model, tok) == [other, tok.eos_token_id]
    model.generation_config.eos_token_id = None
    assert eos_ids(model, tok) == [tok.eos_token_id]


class force_tokens:
    """Make greedy decoding emit ``plan[b][step]`` for ``prompts[b]``, as a context manager: a
    forward hook on the LM head replaces the logits of the last position. A row is told by its
    prompt's length (the position of its last input token + 1, less the steps taken), so the plan
    holds when an engine drops finished rows from the batch."""

    def __init__(self, model, tok, prompts: list[str], plan: list[list[int]]):
        self.model, self.plan, self.step, self.seen = model, plan, 0, None
        self.lengths = [len(tok(p)["input_ids"]) for p in prompts]
        assert len(set(self.lengths)) == len(prompts), "the prompts must differ in length"

    def __enter__(self):
        def remember(module, args, kwargs):
            self.seen = kwargs["position_ids"][:, -1] + 1  # real tokens so far, left padding excluded

        def force(module, args, out):
            forced = torch.full_like(out, -1e4)
            for i, n in enumerate((self.seen - self.step).tolist()):
                row = self.plan[self.lengths.index(n)]
                forced[i, -1, row[min(self.step, len(row) - 1)]] = 1e4
            self.step += 1
            return forced

        self.handles = [self.model.register_forward_pre_hook(remember, with_kwargs=True),
                        self.model.get_output_embeddings().register_forward_hook(force)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("backend", EAGER_ENGINES)
def test_generation_stops_at_either_eos_id_and_cuts_mask_and_text(tiny_student, backend):
    """A model whose generation_config lists two EOS ids: one row ends with the tokenizer's EOS,
    one with the other id, one with the other id after 3 tokens; generation stops when all rows
    have ended (T = 4 < max_new_tokens), and each response ends at its EOS in mask and text."""
    tok, model = tiny_student
    a, b, c = (tok.convert_tokens_to_ids(x) for x in ("1", "2", "3"))
    other = tok.convert_tokens_to_ids("7")
    E = tok.eos_token_id
    model.generation_config.eos_token_id = [E, other]
    with force_tokens(model, tok, PROMPTS[:3], [[a, E, b, b, b, b], [a, b, c, other, b, b], [other, a, a, a, a, a]]):
        ro = generate(model, tok, PROMPTS[:3], max_new_tokens=8, greedy=True, backend=backend)
    assert ro.response_ids_BT.shape[1] == 4  # stopped when every row had ended, not at 8 tokens
    assert ro.response_mask_BT.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ro.response_ids_BT.tolist() == [[a, E, tok.pad_token_id, tok.pad_token_id], [a, b, c, other],
                                           [other, tok.pad_token_id, tok.pad_token_id, tok.pad_token_id]]
    assert ro.texts == ["1", "123", ""]


@pytest.mark.parametrize("backend", EAGER_ENGINES)
def test_explicit_eos_token_ids_replace_the_default(tiny_student, backend):
    tok, model = tiny_student
    a, b = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
    with force_tokens(model, tok, PROMPTS[:1], [[a, b, a, a, a, a]]):
        ro = generate(model, tok, PROMPTS[:1], max_new_tokens=6, greedy=True, eos_token_ids=[b], backend=backend)
    assert ro.response_ids_BT.tolist() == [[a, b]] and ro.texts == ["1"]


def test_the_lean_loop_keeps_placeholder_rows_down_to_min_rows(tiny_student):
    """min_rows=2 (what lean-compiled asks, so that no one-row shape is compiled mid-run): rows
    end after 2 and 3 tokens, one runs on; the decode batch shrinks to one row with min_rows=1
    and to two (a placeholder kept) with min_rows=2, and the tokens are the same."""
    from effopd.rollout import lean_engine

    tok, model = tiny_student
    a, b, c = (tok.convert_tokens_to_ids(x) for x in ("1", "2", "3"))
    E = tok.eos_token_id
    prompts = PROMPTS[:3]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, greedy=True, eos=[E], pad_id=tok.pad_token_id,
              bos_id=tok.bos_token_id, keep_logprobs=False)
    out, rows = {}, {}
    for m in (1, 2):
        seen: list[int] = []
        h = model.register_forward_pre_hook(lambda mod, args, k: seen.append(k["input_ids"].shape[0]), with_kwargs=True)
        with force_tokens(model, tok, prompts, [[a, E, b, b, b, b], [a, b, E, c, c, c], [c, c, c, c, c, c]]), torch.no_grad():
            ids, _ = lean_engine(model, enc["input_ids"], enc["attention_mask"], min_rows=m, **kw)
        h.remove()
        out[m], rows[m] = torch.where(response_mask(ids, [E]).bool(), ids, -1), seen
    assert out[1].tolist() == [[a, E, -1, -1, -1, -1], [a, b, E, -1, -1, -1], [c] * 6]
    assert torch.equal(out[1], out[2])
    assert rows[1] == [3, 3, 2, 1, 1, 1] and rows[2] == [3, 3, 2, 2, 2, 2]


@pytest.mark.slow
def test_the_compiled_engine_samples_as_the_lean_loop(tiny_student):
    """lean-compiled: greedy tokens equal lean's, a second batch size runs without a new
    compile error, sampled logprobs equal a teacher-forced forward to 1e-4, and the model keeps
    its parameters and state dict (the compiled forward is not attached to it)."""
    tok, model = tiny_student
    keys, n_params = list(model.state_dict()), len(list(model.parameters()))
    eager = generate(model, tok, PROMPTS, max_new_tokens=10, greedy=True, backend="lean")
    compiled = generate(model, tok, PROMPTS, max_new_tokens=10, greedy=True, backend="lean-compiled")
    assert torch.equal(compiled.response_ids_BT, eager.response_ids_BT) and compiled.texts == eager.texts
    with isolated_rng(2):
        ro = generate(model, tok, PROMPTS[:3] * 3, max_new_tokens=10, keep_logprobs=True, backend="lean-compiled")
    assert ro.response_mask_BT.sum() > 9
    torch.testing.assert_close(ro.logp_BT, score(model, ro), rtol=0, atol=1e-4)
    assert list(model.state_dict()) == keys and len(list(model.parameters())) == n_params


# ---- what generation keeps -------------------------------------------------------------------------


def spy_generate(monkeypatch, model, force_logits: bool = False) -> list[dict]:
    """Record the generation config and processors of every ``model.generate`` call; with
    ``force_logits`` also ask for HF's stacked per-step logits (a reference, never used by effopd)."""
    calls, original = [], model.generate

    def spy(*args, generation_config: GenerationConfig, **kwargs):
        calls.append({"config": generation_config, "processors": list(kwargs.get("logits_processor") or []), "logits": None})
        if not force_logits:
            return original(*args, generation_config=generation_config, **kwargs)
        forced = GenerationConfig(**{**generation_config.to_dict(), "output_logits": True, "return_dict_in_generate": True})
        out = original(*args, generation_config=forced, **kwargs)
        calls[-1]["logits"] = out.logits
        return out.sequences

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_without_keep_logprobs_no_logits_are_kept_and_logp_is_zero(tiny_student, monkeypatch):
    tok, model = tiny_student
    calls = spy_generate(monkeypatch, model)
    ro = generate(model, tok, PROMPTS * 2, max_new_tokens=8, batch_size=3, backend="hf")
    assert len(calls) == 3
    for call in calls:
        cfg = call["config"]
        assert cfg.output_logits is False and cfg.output_scores is False and cfg.return_dict_in_generate is False
        assert call["processors"] == []
    assert torch.equal(ro.logp_BT, torch.zeros_like(ro.logp_BT))


@pytest.mark.parametrize("temperature,top_p,greedy", [(0.7, 0.9, False), (1.0, 1.0, False), (1.0, 1.0, True)])
def test_keep_logprobs_equals_the_full_logits_reference(tiny_student, monkeypatch, temperature, top_p, greedy):
    """The step-by-step logprobs equal log_softmax(logits / temperature) of HF's own stacked
    per-step logits of the same call (before top-p truncation), without asking HF to stack them."""
    tok, model = tiny_student
    calls = spy_generate(monkeypatch, model, force_logits=True)
    torch.manual_seed(0)
    ro = generate(model, tok, PROMPTS * 2, max_new_tokens=10, temperature=temperature, top_p=top_p, greedy=greedy,
                  keep_logprobs=True, backend="hf")
    (call,) = calls
    assert call["config"].output_logits is False  # effopd asked for none; the spy added them
    logits = torch.stack(call["logits"], 1).float() / (1.0 if greedy else temperature)
    ref = torch.log_softmax(logits, -1).gather(-1, ro.response_ids_BT[..., None]).squeeze(-1) * ro.response_mask_BT
    assert ro.response_mask_BT.sum() > ro.response_mask_BT.shape[0]  # several real tokens per row
    torch.testing.assert_close(ro.logp_BT, ref, atol=1e-6, rtol=0)


def test_sampling_ignores_the_models_generation_config_top_k(tiny_student):
    """Qwen3 ships generation_config top_k=20; generate samples the untruncated distribution the
    trainer scores. With top_k=1 filled in, every sample would be the greedy response."""
    tok, model = tiny_student
    model.generation_config.top_k = 1
    greedy = generate(model, tok, PROMPTS, max_new_tokens=8, greedy=True, backend="hf").texts
    with isolated_rng(0):
        sampled = [generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0, backend="hf").texts for _ in range(3)]
    assert any(s != greedy for s in sampled)


def test_length_bucketed_scoring_equals_the_padded_batch(tiny_student):
    """Rows sorted by length and scored in groups, each on its own trimmed width, give the padded
    batch's logprobs to float rounding, zeros on padding, and the prompt columns that are
    padding in every row of a group change nothing."""
    from effopd.scoring import trimmed

    tok, model = tiny_student
    prompts = ["1+2=", "10+20+30-5=", "3=", "45-12+7=", "99-1=", "2+2+2+2+2="]
    with isolated_rng(3):
        ro = generate(model, tok, prompts, max_new_tokens=14)
    assert len(set(ro.lengths_B.tolist())) > 2  # lengths differ, so the buckets are narrower than the batch
    padded = score(model, ro)
    for buckets, chunk in ((2, None), (3, None), (3, 1), (6, None), (50, None)):
        b = score(model, ro, buckets=buckets, chunk_size=chunk)
        torch.testing.assert_close(b, padded, rtol=0, atol=1e-5)
        assert (b[ro.response_mask_BT == 0] == 0).all()
    short = trimmed(ro.select(torch.tensor([0, 2])))
    assert short.prompt_ids_BP.shape[1] < ro.prompt_ids_BP.shape[1] and short.response_ids_BT.shape[1] == int(ro.lengths_B[[0, 2]].max())
    torch.testing.assert_close(score(model, short), padded[[0, 2], : short.response_ids_BT.shape[1]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="buckets=0 must be a positive integer"):
        score(model, ro, buckets=0)


def test_packed_scoring_equals_the_padded_batch(tiny_student):
    """pack=True: the real tokens of several rows share a row, kept apart by their positions;
    the logprobs are the padded batch's (to float rounding), zeros on padding, and the packed
    rows are fewer than the batch's and no wider than its longest sequence."""
    from effopd.scoring import packing

    tok, model = tiny_student
    prompts = ["1+2=", "10+20+30-5=", "3=", "45-12+7=", "99-1=", "2+2+2+2+2="] * 2
    with isolated_rng(4):
        ro = generate(model, tok, prompts, max_new_tokens=14)
    assert len(set(ro.lengths_B.tolist())) > 2
    ids_NC, pos_NC, index_BT = packing(ro)
    lengths_B = ro.prompt_mask_BP.sum(1) + ro.response_mask_BT.sum(1)
    assert ids_NC.shape[0] < len(prompts) and ids_NC.shape[1] == int(lengths_B.max())
    assert int((pos_NC == 0).sum()) >= len(prompts)  # every sequence starts at position 0
    padded = score(model, ro)
    packed = token_logprobs(model, ro, pack=True)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert (packed[ro.response_mask_BT == 0] == 0).all()
    for temperature in (0.7,):  # a tempered head, and a gradient
        torch.testing.assert_close(token_logprobs(model, ro, temperature, pack=True), score(model, ro, temperature),
                                   rtol=0, atol=1e-5)
    ro.response_mask_BT[:] = 0  # nothing to pack: the padded path, zeros
    assert packing(ro) is None and (token_logprobs(model, ro, pack=True) == 0).all()


def test_packed_frozen_scoring_equals_the_padded_batch(tiny_student):
    """score(pack=True), as the teacher and base are scored with train.pack: the padded batch's
    logprobs to 1e-5, in one pass or several (chunk_size), buckets ignored; the same through
    the teacher's entry point."""
    from effopd.teachers import teacher_logprobs

    tok, model = tiny_student
    with isolated_rng(5):
        ro = generate(model, tok, ["1+2=", "10+20+30-5=", "3=", "45-12+7=", "99-1="] * 2, max_new_tokens=14)
    padded = score(model, ro)
    for kw in ({}, {"chunk_size": 3}, {"buckets": 4}):
        packed = score(model, ro, pack=True, **kw)
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
        assert (packed[ro.response_mask_BT == 0] == 0).all()
    torch.testing.assert_close(teacher_logprobs(model, ro, 0.8, pack=True), score(model, ro, 0.8), rtol=0, atol=1e-5)


def test_packing_refuses_a_model_whose_attention_ignores_it(tiny_student, monkeypatch):
    """The first packed forward compares packed with padded logprobs; an attention that lets
    packed sequences see each other (here: transformers told no sequence is packed) is caught."""
    import copy

    import transformers.masking_utils as mu

    tok, model = tiny_student
    model = copy.deepcopy(model)
    with isolated_rng(4):
        ro = generate(model, tok, ["1+2=", "10+20+30-5=", "3=", "45-12+7="], max_new_tokens=8)
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="does not keep packed sequences apart.*train.pack=false"):
        token_logprobs(model, ro, pack=True)
    monkeypatch.undo()
    torch.testing.assert_close(token_logprobs(model, ro, pack=True), score(model, ro), rtol=0, atol=1e-5)


# ---- the lean engine -------------------------------------------------------------------------------


def test_lean_greedy_decoding_equals_generate(tiny_student):
    """Rows that end early leave the lean engine's batch; the others' tokens are those of HF
    ``generate``, and so are every row's ids, mask and text."""
    tok, model = tiny_student
    prompts = PROMPTS * 3 + ["7+7=", "100-99+1="]
    a = generate(model, tok, prompts, max_new_tokens=16, greedy=True, backend="hf")
    b = generate(model, tok, prompts, max_new_tokens=16, greedy=True, backend="lean")
    assert torch.equal(a.response_ids_BT, b.response_ids_BT) and torch.equal(a.response_mask_BT, b.response_mask_BT)
    assert a.texts == b.texts


def test_lean_engine_drops_rows_as_they_end(tiny_student):
    """Each decode step runs only the rows still going: one row ends at its first token, one at
    its second, so the forwards see 3, 2, 1, 1 rows (HF generate keeps all 3 to the end)."""
    tok, model = tiny_student
    a, b, c = (tok.convert_tokens_to_ids(x) for x in ("1", "2", "3"))
    E = tok.eos_token_id
    rows: list[int] = []
    seen = model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        with force_tokens(model, tok, PROMPTS[:3], [[a, E], [a, b, c, E], [E]]):
            ro = generate(model, tok, PROMPTS[:3], max_new_tokens=8, greedy=True, backend="lean")
    finally:
        seen.remove()
    assert rows == [3, 2, 1, 1]
    assert ro.response_mask_BT.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]] and ro.texts == ["1", "123", ""]


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.999, 1.0])
def test_top_p_filter_keeps_the_smallest_nucleus(top_p):
    """Against a per-row reference: the kept tokens are the most likely ones up to and including
    the one whose cumulative probability first reaches top_p; their logits are unchanged."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g) * 2
    out = top_p_filter(logits, top_p)
    for row, kept in zip(logits, out):
        probs = row.softmax(-1).tolist()
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        total, nucleus = 0.0, set()
        for i in order:
            nucleus.add(i)
            total += probs[i]
            if total >= top_p:
                break
        assert {i for i in range(len(probs)) if kept[i] > float("-inf")} == nucleus
        assert torch.equal(kept[sorted(nucleus)], row[sorted(nucleus)])


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_lean_sampling_draws_what_generate_draws_while_no_row_has_ended(tiny_student, temperature, top_p):
    """Same seed, same distribution, so the same first tokens as HF ``generate`` (before any row
    ends and leaves the lean batch, the two consume the random stream alike)."""
    tok, model = tiny_student
    draws = []
    for backend in ("hf", "lean"):
        with isolated_rng(4):
            draws.append(generate(model, tok, PROMPTS * 6, max_new_tokens=1, temperature=temperature, top_p=top_p,
                                  backend=backend).response_ids_BT)
    assert len(set(draws[0][:, 0].tolist())) > 1 and torch.equal(draws[0], draws[1])


def test_an_unknown_backend_is_refused_with_the_choices(tiny_student):
    tok, model = tiny_student
    with pytest.raises(ValueError, match=r"rollout.backend='vllm' is not one of \['hf', 'lean', 'lean-compiled'\]"):
        generate(model, tok, PROMPTS, max_new_tokens=4, backend="vllm")
