import pytest
import torch

from scratchgpt.nn.fastpath import set_fast_decode
from scratchgpt.nn.generate import generate, generate_batch, generate_stream, next_token
from scratchgpt.nn.model import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=101, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return GPTModel(CFG).eval()


def book_greedy_loop(model, idx, max_new_tokens, context_size):
    """The book's simple loop: crop to the context, argmax of the last position, append."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("max_new", [5, 40])  # 40 runs past the 24-token window: the cache must slide
def test_greedy_with_and_without_cache_is_token_for_token_identical(model, max_new):
    idx = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    cached = generate(model, idx, max_new, use_cache=True)
    uncached = generate(model, idx, max_new, use_cache=False)
    assert cached.shape == (2, 6 + max_new)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, book_greedy_loop(model, idx, max_new, CFG.context_length))


def test_prompt_longer_than_the_context_is_cropped(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 30))
    out = generate(model, idx, 3)
    assert torch.equal(out[:, :30], idx)
    assert torch.equal(out, book_greedy_loop(model, idx, 3, CFG.context_length))


def test_stream_yields_the_same_tokens_as_generate(model):
    idx = torch.tensor([[1, 2, 3]])
    streamed = torch.cat(list(generate_stream(model, idx, 8)), dim=1)
    assert torch.equal(torch.cat([idx, streamed], dim=1), generate(model, idx, 8))


def test_stops_at_eos_without_appending_it(model):
    idx = torch.tensor([[5, 6, 7]])
    full = generate(model, idx, 10)
    eos = int(full[0, 6])  # the 4th generated token
    first = int((full[0, 3:] == eos).nonzero()[0])
    out = generate(model, idx, 10, eos_id=eos)
    assert torch.equal(out, full[:, : 3 + first])


def test_batch_rows_that_finish_early_are_padded_with_eos(model):
    idx = torch.tensor([[5, 6, 7], [8, 9, 10]])
    full = generate(model, idx, 10)
    eos = int(full[0, 4])
    out = generate(model, idx, 10, eos_id=eos)
    row0 = out[0, 3:]
    hit = int((row0 == eos).nonzero()[0])
    assert (row0[hit:] == eos).all()
    assert out.shape[1] <= 13


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k(model):
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 12, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 12, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_only_samples_among_the_k_largest():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, temperature=10.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, temperature=1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.75 so the second token is needed; the rest are cut
    only_top = {int(next_token(logits, temperature=1.0, top_p=0.1, generator=g)) for _ in range(50)}
    assert only_top == {0}


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 0.2, 3.0], [2.0, 0.0, 0.0]])
    assert next_token(logits).tolist() == [[2], [0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": 0, "temperature": 1.0}, "top_k must be a positive integer"),
        ({"top_p": 1.5, "temperature": 1.0}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1]]), 2, **kwargs)


def test_generation_restores_training_mode(model):
    model.train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training
    model.eval()


def test_batched_generation_of_prompts_of_different_lengths_equals_one_at_a_time():

    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=97, context_length=40, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    model = GPTModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 7, 3, 12, 7)]
    batched = generate_batch(model, prompts, 15, pad_id=5)
    alone = [generate_batch(model, [p], 15)[0] for p in prompts]
    assert batched == alone and all(len(r) == 15 for r in batched)
    for p, r in zip(prompts, alone, strict=True):  # and what the plain cached loop generates
        assert generate(model, torch.tensor([p]), 15)[0, len(p):].tolist() == r
    # left padding changes nothing visible: logits of real tokens equal the unpadded ones
    padded = torch.tensor([[5, 5, 5, *prompts[2]]])
    with torch.no_grad():
        a = model(padded, left_pad=torch.tensor([3]))[:, 3:]
        b = model(torch.tensor([prompts[2]]))
    assert torch.allclose(a, b, atol=1e-5)


def test_batched_generation_stops_each_row_at_eos_and_crops_long_prompts():

    torch.manual_seed(4)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0))
    prompts = [[1, 2, 3], [4] * 30]
    free = generate_batch(model, prompts, 6)
    eos = free[0][2]  # make row 0 stop after two tokens
    stopped = generate_batch(model, prompts, 6, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]
    assert stopped[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])
    assert generate_batch(model, [[4] * 10], 6) == generate_batch(model, [[4] * 30], 6)  # kept the last 10
    with pytest.raises(ValueError, match="leaves no room"):
        generate_batch(model, prompts, 16)


def test_fast_decode_gives_the_same_tokens_as_the_default_blas(model, monkeypatch):
    """oneDNN's matrix-vector products (`scratchgpt.nn.fastpath.linear`) change no greedy token, batched or not."""
    monkeypatch.setattr("scratchgpt.nn.fastpath.FAST_DECODE_MIN_WEIGHTS", 0)
    torch.manual_seed(3)
    idx = torch.randint(0, CFG.vocab_size, (2, 5))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    fast = generate(model, idx, 30), generate_batch(model, prompts, 12)
    old = set_fast_decode(False)
    try:
        plain = generate(model, idx, 30), generate_batch(model, prompts, 12)
    finally:
        set_fast_decode(old)
    assert torch.equal(fast[0], plain[0])
    assert fast[1] == plain[1]
