import torch

from effopd.rollout import generate, response_mask
from effopd.scoring import score, token_logprobs
from effopd.utils import isolated_rng

PROMPTS = ["12+3=", "45+67-8=", "9=", "10-2+33-4="]  # different lengths: left padding matters


def test_response_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert response_mask(ids, eos_token_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_generate_shapes_masks_and_texts(tiny_student):
    tok, model = tiny_student
    ro = generate(model, tok, PROMPTS, max_new_tokens=12)
    B, T = ro.response_ids_BT.shape
    assert B == 4 and T <= 12 and ro.logp_BT.shape == (B, T)
    assert (ro.logp_BT <= 0).all()
    # padding after EOS is pad and has zero logprob
    assert (ro.response_ids_BT[ro.response_mask_BT == 0] == tok.pad_token_id).all()
    assert (ro.logp_BT[ro.response_mask_BT == 0] == 0).all()
    assert ro.texts == tok.batch_decode(ro.response_ids_BT, skip_special_tokens=True)
    assert ro.prompt_ids_BP[0, 0] == tok.pad_token_id  # short prompt is left-padded


def test_scoring_matches_sampling_logprobs(tiny_student):
    """The trainer's forward pass must see exactly what the sampler saw: same positions despite
    left padding, same next-token distribution."""
    tok, model = tiny_student
    for temperature in (1.0, 0.7):
        ro = generate(model, tok, PROMPTS * 3, max_new_tokens=10, temperature=temperature)
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


def test_batched_generation_equals_one_batch_greedy(tiny_student):
    tok, model = tiny_student
    a = generate(model, tok, PROMPTS, max_new_tokens=8, greedy=True)
    b = generate(model, tok, PROMPTS, max_new_tokens=8, greedy=True, batch_size=3)
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
