"""Chunked scoring (``effopd.scoring.token_logprobs``): the hidden states it reads, its values and
gradients against a full-logits reference, its peak memory, and gradient synchronisation under
DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf

from effopd.rollout import Rollout
from effopd.scoring import CHUNK_POSITIONS, response_hidden_states, score, token_logprobs

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_qwen3(vocab: int = 300, tied: bool = True, seed: int = 0, dtype=torch.float32) -> tf.Qwen3ForCausalLM:
    """A random 2-layer Qwen3 whose final norm is not the identity (so pre- and post-norm hidden
    states differ) and whose logits are not near uniform."""
    torch.manual_seed(seed)
    cfg = tf.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied,
                         max_position_embeddings=256)
    model = tf.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
        model.get_output_embeddings().weight.mul_(20.0)  # logits of a few units, not ~0.1
    return model.to(dtype)


def random_rollout(vocab: int, prompt_lens, response_lens, T: int, seed: int = 0) -> Rollout:
    """Left-padded prompts and right-padded responses of the given lengths (pad id 0), T columns."""
    g = torch.Generator().manual_seed(seed)
    B, P = len(prompt_lens), max(prompt_lens)
    prompt, pmask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, P, dtype=torch.long)
    resp, rmask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompt[b, P - p :] = torch.randint(1, vocab, (p,), generator=g)
        pmask[b, P - p :] = 1
        resp[b, :r] = torch.randint(1, vocab, (r,), generator=g)
        rmask[b, :r] = 1
    return Rollout(prompt, pmask, resp, rmask, torch.zeros(B, T), [""] * B)


def reference_logprobs(model, ro: Rollout, temperature: float) -> torch.Tensor:
    """log_softmax over the full (B, L, V) logits of one plain forward pass, at the positions that
    predict each response token; 0 on padding."""
    ids = torch.cat([ro.prompt_ids_BP, ro.response_ids_BT], 1)
    mask = torch.cat([ro.prompt_mask_BP, ro.response_mask_BT], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    P, T = ro.prompt_ids_BP.shape[1], ro.response_ids_BT.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    lp = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float() / temperature, -1)
    return lp.gather(-1, ro.response_ids_BT[..., None]).squeeze(-1) * ro.response_mask_BT


def param_grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn().backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


# Rows of different prompt and response lengths; columns 10..12 are padding in every row, so a
# chunk there holds no real token.
PROMPT_LENS, RESPONSE_LENS, T = (3, 7, 5), (10, 4, 1), 13
WEIGHTS = torch.linspace(0.5, 1.5, T)  # a loss that weighs positions differently


def test_hidden_states_last_is_the_final_norm_output_the_lm_head_consumes():
    """transformers 5.24: out.hidden_states[-1] is the final-norm output (lm_head of it gives the
    logits), equal to the decoder's last_hidden_state (what ``response_hidden_states`` captures
    from the decoder); the layer output before it is not."""
    model = tiny_qwen3(tied=False)
    ro = random_rollout(300, PROMPT_LENS, RESPONSE_LENS, T)
    ids = torch.cat([ro.prompt_ids_BP, ro.response_ids_BT], 1)
    mask = torch.cat([ro.prompt_mask_BP, ro.response_mask_BT], 1)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1]
        head = model.get_output_embeddings()
        torch.testing.assert_close(head(h[:, -1:]), out.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(head(h), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state,
                                   h, atol=1e-6, rtol=0)
        assert (head(out.hidden_states[-2][:, -1:]) - out.logits).abs().max() > 0.1  # the pre-norm state is not it


@pytest.mark.parametrize("tied", [True, False])
def test_response_hidden_states_with_and_without_grad_predict_the_response(tied):
    """Both ways of getting the hidden states (the model's own forward with its decoder's output
    captured, under grad; the decoder alone, without) give the states whose LM-head logits are
    the full forward's."""
    model = tiny_qwen3(tied=tied)
    ro = random_rollout(300, PROMPT_LENS, RESPONSE_LENS, T)
    ref = reference_logprobs(model, ro, 1.0).detach()
    head = model.get_output_embeddings()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            h = response_hidden_states(model, ro)
            lp = torch.log_softmax(head(h).float(), -1).gather(-1, ro.response_ids_BT[..., None]).squeeze(-1)
        assert h.shape == (3, T, 32) and h.requires_grad == grad
        torch.testing.assert_close(lp.detach() * ro.response_mask_BT, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, T, 64])  # 5 does not divide T = 13; 64 > T
def test_chunked_logprobs_and_gradients_equal_the_full_logits_reference(chunk, tied):
    model = tiny_qwen3(tied=tied)
    ro = random_rollout(300, PROMPT_LENS, RESPONSE_LENS, T)
    temperature = 0.7
    ref = reference_logprobs(model, ro, temperature)
    got = token_logprobs(model, ro, temperature, chunk_positions=chunk)
    assert got.dtype == torch.float32 and got.shape == (3, T)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got[ro.response_mask_BT == 0] == 0).all()
    g_ref = param_grads(model, lambda: (reference_logprobs(model, ro, temperature) * WEIGHTS).sum())
    g_got = param_grads(model, lambda: (token_logprobs(model, ro, temperature, chunk_positions=chunk) * WEIGHTS).sum())
    assert g_ref.keys() == g_got.keys() and len(g_got) == len(list(model.parameters()))
    for n in g_ref:  # 1e-5 of each gradient's scale: float32 sums over the positions in another order
        scale = g_ref[n].abs().max().item()
        assert (g_got[n] - g_ref[n]).abs().max().item() <= 1e-5 * scale, n
    with torch.no_grad():  # the decoder-only path of the frozen models
        torch.testing.assert_close(token_logprobs(model, ro, temperature, chunk_positions=chunk), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(score(model, ro, temperature, chunk_size=2, chunk_positions=chunk), ref.detach(), atol=1e-5, rtol=0)


def test_chunked_logprobs_of_a_bf16_model_equal_its_full_logits_reference():
    """bf16 weights: both sides run the same bf16 matmuls (the chunk's LM head vs the full one)
    and take the logsumexp in float32. A bf16 logit carries a relative rounding step of 2^-8;
    with |logit| <= M (about 10 here) a different accumulation order can move the chosen logit
    and the logsumexp by one step each, so values agree to 2 * 2^-8 * M (not 1e-5). Gradients
    are bf16 tensors accumulated in a different order: compared at 3% of their scale."""
    model = tiny_qwen3(dtype=torch.bfloat16)
    ro = random_rollout(300, PROMPT_LENS, RESPONSE_LENS, T)
    temperature = 0.7
    ref = reference_logprobs(model, ro, temperature)
    with torch.no_grad():
        M = float(model(input_ids=ro.response_ids_BT, use_cache=False).logits.float().abs().max()) / temperature
    for chunk in (5, 64):
        got = token_logprobs(model, ro, temperature, chunk_positions=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=2 * 2**-8 * M, rtol=0)
        g_ref = param_grads(model, lambda: (reference_logprobs(model, ro, temperature) * WEIGHTS).sum())
        g_got = param_grads(model, lambda: (token_logprobs(model, ro, temperature, chunk_positions=chunk) * WEIGHTS).sum())
        for n in g_ref:
            scale = g_ref[n].abs().max().item()
            assert (g_got[n] - g_ref[n]).abs().max().item() <= 0.03 * scale + 1e-6, n


def test_an_all_padding_batch_backpropagates_zeros_into_every_parameter():
    """Chunks of padding are skipped, but a micro-batch of empty responses must still give a loss
    whose backward runs and reaches every parameter (with zeros), as DDP expects."""
    model = tiny_qwen3()
    ro = random_rollout(300, (3, 4), (0, 0), 6)
    lp = token_logprobs(model, ro, 0.7, chunk_positions=2)
    assert lp.requires_grad and torch.equal(lp, torch.zeros(2, 6))
    grads = param_grads(model, lambda: lp.sum())
    assert len(grads) == len(list(model.parameters())) and all(g.abs().max() == 0 for g in grads.values())


def test_bad_chunk_and_temperature_are_rejected_with_the_input_named():
    model = tiny_qwen3()
    ro = random_rollout(300, PROMPT_LENS, RESPONSE_LENS, T)
    with pytest.raises(ValueError, match="chunk_positions=0 must be a positive integer"):
        token_logprobs(model, ro, chunk_positions=0)
    with pytest.raises(ValueError, match="temperature=0 must be a number > 0"):
        token_logprobs(model, ro, 0)
    with pytest.raises(ValueError, match="chunk_size=-1"):
        score(model, ro, chunk_size=-1)
    from effopd.config import TrainConfig

    assert CHUNK_POSITIONS == TrainConfig().logit_chunk  # the function's default is the trainer's


# ---- peak memory ---------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent('''
    import json, resource, sys
    import torch, transformers as tf
    from effopd.rollout import Rollout
    from effopd.scoring import token_logprobs

    mode, V, B, T, H, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tf.Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=H // 2, tie_word_embeddings=True, max_position_embeddings=T + 16)
    model = tf.Qwen3ForCausalLM(cfg)

    def rollout(T):
        ids = torch.randint(1, V, (B, T))
        return Rollout(torch.randint(1, V, (B, 4)), torch.ones(B, 4, dtype=torch.long), ids, torch.ones(B, T, dtype=torch.long),
                       torch.zeros(B, T), [""] * B)

    def naive(ro):  # full logits and a full log_softmax, as scoring did before chunking
        ids = torch.cat([ro.prompt_ids_BP, ro.response_ids_BT], 1)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=ro.response_ids_BT.shape[1] + 1).logits[:, :-1].float()
        return torch.log_softmax(logits / 0.7, -1).gather(-1, ro.response_ids_BT[..., None]).squeeze(-1)

    def run(ro):
        lp = token_logprobs(model, ro, 0.7, chunk_positions=chunk) if mode == "chunked" else naive(ro)
        lp.sum().backward()
        model.zero_grad(set_to_none=False)  # keep the grad buffers allocated: they are not logits

    def rss():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    run(rollout(8))  # warm-up: kernels, thread pools and the weights' grad buffers, at a small T
    run(rollout(8))
    base, _ = rss()
    try:  # reset the peak-RSS mark, so that earlier peaks (imports, model build) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    run(rollout(T))
    _, hwm = rss()
    peak = hwm if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": peak - base, "reset": reset}))
''')


def peak_growth(mode: str, V: int, B: int, T: int, H: int, chunk: int) -> int:
    """Peak RSS growth (bytes) of one forward + backward, measured in a fresh process."""
    # MALLOC_MMAP_THRESHOLD_: glibc serves every allocation above 64 KiB by its own mmap and
    # unmaps it when freed, so RSS follows the live tensors; with its default (dynamic) threshold,
    # freed multi-MB tensors stay in the heap and RSS keeps memory that is no longer in use.
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode, str(V), str(B), str(T), str(H), str(chunk)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.slow
def test_peak_memory_with_grad_is_a_few_slabs_not_the_full_logits():
    """V = 50,000, B = 4, T = 256, hidden 32, one layer, tied embeddings (V*H*4 = 6.4 MB, its
    gradient buffer allocated during the warm-up). Full float32 logits are B*T*V*4 = 204.8 MB;
    the naive forward + backward holds several such tensors (logits, log_softmax, their
    gradients), so its peak exceeds them. One (B, chunk = 8, V) float32 slab is 6.4 MB; a
    chunk's backward holds a few slab-sized temporaries (recomputed logits, the softmax of the
    logsumexp's gradient, the gather's gradient) and a weight-sized LM-head gradient, so the
    chunked peak stays under 8 slabs (51 MB), a quarter of the full logits, whatever T is."""
    V, B, T, H, chunk = 50_000, 4, 256, 32, 8
    full_logits = B * T * V * 4
    slab = B * chunk * V * 4
    chunked = peak_growth("chunked", V, B, T, H, chunk)
    naive = peak_growth("naive", V, B, T, H, chunk)
    print(f"peak RSS growth: chunked {chunked / 1e6:.1f} MB, naive {naive / 1e6:.1f} MB, "
          f"full logits {full_logits / 1e6:.1f} MB, slab {slab / 1e6:.1f} MB")
    assert naive > full_logits
    assert chunked < 8 * slab  # = full_logits / 4


# ---- DistributedDataParallel ---------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_scoring_memory import random_rollout, tiny_qwen3
    from effopd.scoring import score, token_logprobs

    rank, world, store = int(sys.argv[1]), 2, sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = tiny_qwen3(seed=3)
    rollouts = [random_rollout(300, (3, 5), (6, 4), 7, seed=s) for s in range(world)]
    local = []
    for ro in rollouts:  # each rank's own gradient, without DDP
        model.zero_grad(set_to_none=True)
        token_logprobs(model, ro, 0.7, chunk_positions=3).sum().backward()
        local.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = []
    ddp.register_forward_hook(lambda *a: calls.append(1))
    token_logprobs(ddp, rollouts[rank], 0.7, chunk_positions=3).sum().backward()
    err = max((p.grad - (local[0][n] + local[1][n]) / 2).abs().max().item() for n, p in model.named_parameters())
    own = max((p.grad - local[rank][n]).abs().max().item() for n, p in model.named_parameters())
    with torch.no_grad():
        nograd = (score(ddp, rollouts[rank], 0.7) - token_logprobs(model, rollouts[rank], 0.7)).abs().max().item()
    print(json.dumps({"err": err, "own": own, "calls": len(calls), "nograd": nograd}))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_wrapped_student_gets_synchronised_gradients(tmp_path):
    """Two gloo ranks score different rollouts through a DDP wrapper: after backward each rank
    holds the mean of the two ranks' gradients (DDP synchronised them because its own forward
    ran), not its own."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "TEST_DIR": str(Path(__file__).resolve().parent)}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["calls"] >= 1  # the wrapper's forward ran (grad path); the no-grad score may skip it
        assert r["err"] < 1e-6, results
        assert r["own"] > 1e-4, results  # the two ranks' gradients really differ, so the mean is visible
        assert r["nograd"] < 1e-6
