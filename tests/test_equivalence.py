"""The optimised paths of both scripts against plain reference paths written here, on the same inputs.

Each fast path (scaled_dot_product_attention with the relative-position term as a bias, the key/value cache,
the CNN batched over burn-in frames, the tokenizer run in slices of frames, in-place residual blocks) must
give the numbers of the textbook computation it replaces.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iris  # noqa: E402
import twm  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def plain_softmax_attention(scores, allowed, values):
    """softmax over keys of the allowed scores, times the values: (B, nh, T, S) x (B, nh, S, hs)."""
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return weights @ values


@pytest.mark.parametrize("memory_tokens", [0, 5])
def test_twm_relative_attention_equals_the_transformer_xl_formula(memory_tokens):
    torch.manual_seed(0)
    args = twm.Args(**twm.TINY)
    attn = twm.RelativeSelfAttention(args).eval()
    B, T, nh, hs, d = 2, 4, args.dyn_heads, args.dyn_head_dim, args.dyn_embed_dim
    S = memory_tokens + T
    x = torch.randn(B, T, d)
    memory = (torch.randn(B, nh, memory_tokens, hs), torch.randn(B, nh, memory_tokens, hs))
    rel_enc, u, v = twm.sinusoid_table(S, d), torch.randn(nh, 1, hs), torch.randn(nh, 1, hs)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, T, S).clone()
    allowed[1, 2:, :2] = False  # row 1: queries 2.. start a new episode and must not see keys 0 and 1
    with torch.no_grad():
        out, (keys, values) = attn(x, memory, rel_enc, u, v, allowed)
        # reference: score(i, j) = [(q_i + u) . k_j + (q_i + v) . W_r R_{i-j}] / sqrt(d), one pair at a time
        q, k_new, val_new = (t.view(B, T, nh, hs).transpose(1, 2) for t in attn.qkv(x).chunk(3, -1))
        k, val = torch.cat([memory[0], k_new], 2), torch.cat([memory[1], val_new], 2)
        r = attn.pos(rel_enc).view(S, nh, hs)  # row p: distance p
        scores = torch.zeros(B, nh, T, S)
        for i in range(T):
            for j in range(S):
                distance = max(memory_tokens + i - j, 0)
                content = ((q[:, :, i] + u[:, 0]) * k[:, :, j]).sum(-1)
                position = ((q[:, :, i] + v[:, 0]) * r[distance]).sum(-1)
                scores[:, :, i, j] = (content + position) / d**0.5
        y = plain_softmax_attention(scores, allowed[:, None], val)
        reference = attn.out(y.transpose(1, 2).reshape(B, T, nh * hs))
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.equal(keys, k) and torch.equal(values, val)


def test_iris_attention_with_cache_equals_plain_causal_attention():
    torch.manual_seed(0)
    d, nh, B, past, T = 32, 4, 2, 6, 3
    attn = iris.SelfAttention(d, nh, dropout=0.0).eval()
    cache = iris.KVCache(1, B, nh, past + T, d // nh, "cpu", torch.float32)
    x_past, x_new = torch.randn(B, past, d), torch.randn(B, T, d)
    with torch.no_grad():
        attn(x_past, cache, 0)
        cache.length = past
        out = attn(x_new, cache, 0)  # 3 new tokens against 6 cached ones
        x = torch.cat([x_past, x_new], 1)
        q, k, v = (t.view(B, past + T, nh, d // nh).transpose(1, 2) for t in attn.qkv(x).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / (d // nh) ** 0.5  # (B, nh, S, S)
        causal = torch.ones(past + T, past + T, dtype=torch.bool).tril()
        y = plain_softmax_attention(scores, causal, v)[:, :, past:]  # the rows of the new tokens
        reference = attn.proj(y.transpose(1, 2).reshape(B, T, d))
    assert torch.allclose(out, reference, atol=1e-5)


def test_iris_batched_burn_in_equals_a_frame_by_frame_loop():
    torch.manual_seed(0)
    ac = iris.ActorCritic(3, 32, channels=(8, 8, 8, 8)).eval()
    frames = torch.rand(3, 5, 3, 64, 64)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False] * 4 + [True]])
    with torch.no_grad():
        h, c = ac.burn_in(frames, mask)  # the CNN runs once over all 15 frames
        for row in range(3):  # reference: one frame at a time, real frames only, from a zero state
            state = ac.initial_state(1, "cpu")
            for t in range(5):
                if mask[row, t]:
                    _, _, state = ac(frames[row, t][None], state)
            assert torch.allclose(h[row], state[0][0], atol=1e-5) and torch.allclose(
                c[row], state[1][0], atol=1e-5
            )


def test_iris_tokenizer_in_slices_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    tokenizer = iris.Tokenizer(
        iris.Args(**{**iris.TINY, "tok_ch": 64})
    ).eval()  # the paper's width: slices of 8
    frames = torch.randint(0, 256, (19, 3, 64, 64), dtype=torch.uint8)  # 19 = 2 full slices of 8 and one of 3
    assert tokenizer.slice == 8
    with torch.no_grad():
        tokens, z, _ = tokenizer.encode(frames)
        decoded = tokenizer.decode(tokens)
        monkeypatch.setattr(
            iris, "in_slices", lambda net, x, n: net(x)
        )  # reference: the whole batch in one pass
        tokens_ref, z_ref, _ = tokenizer.encode(frames)
        decoded_ref = tokenizer.decode(tokens_ref)
    assert torch.allclose(z, z_ref, atol=1e-5) and torch.equal(tokens, tokens_ref)
    assert torch.allclose(decoded, decoded_ref, atol=1e-5)


def test_iris_in_place_resnet_block_equals_the_textbook_block():
    torch.manual_seed(0)
    for cin, cout in ((8, 8), (8, 16)):  # identity shortcut and 1x1 "nin" shortcut
        block, x = iris.ResnetBlock(cin, cout), torch.randn(2, cin, 8, 8, requires_grad=True)
        norm1, _, conv1, norm2, _, conv2 = block.net
        silu = torch.nn.functional.silu
        reference = block.skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))  # out-of-place everywhere
        (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)
        out = block(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.allclose(out, reference, atol=1e-6) and torch.allclose(grad, grad_ref, atol=1e-5)
