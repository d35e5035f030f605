"""Our networks and losses against numbers produced by the official code (tests/golden/, described in its
README).

Each test loads the official state dicts (official names, 4-bit exact weights) into our modules through a name
mapping written here, feeds the stored inputs and compares with the stored outputs. Where we differ on
purpose, the test names the deviation and checks it: TWM's Gaussian log-densities drop their ½ln2π constants,
and TWM trains the next-z loss that the official code at its last commit never computes (jrobine/twm issue
#4).
"""

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iris
import twm

pytestmark = pytest.mark.timeout(120)
GOLDEN = Path(__file__).parent / "golden"
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def close(ours, official, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(ours, official.to(ours.dtype), atol=atol, rtol=rtol)


def decode_q4(param):
    """A 4-bit stored tensor: codes packed two per byte (low nibble first), value = (code + offset) *
    2**exp."""
    q = param["q"]
    codes = torch.stack([q & 15, q >> 4], 1).flatten()[: math.prod(param["shape"])]
    value = ((codes.long() + param["offset"]).float() * 2.0 ** param["exp"]).view(param["shape"])
    assert float(value.double().sum()) == pytest.approx(param["sum"], abs=1e-6)
    return value


def official_weights(golden, net):
    stored = golden["weights"][net]
    return {**{name: decode_q4(p) for name, p in stored["params"].items()}, **stored["buffers"]}


def load_mapped(module, official, mapping):
    """Copy official tensors into `module`: mapping is [(our name, official name or a function of the
    dict)]."""
    ours = module.state_dict()
    for name, source in mapping:
        value = source(official) if callable(source) else official[source]
        ours[name] = value.reshape(ours[name].shape)
    module.load_state_dict(ours, strict=True)
    assert len(mapping) == len([k for k in ours if k != "transformer.rel_enc"])  # every tensor mapped


# ---- TWM ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twm_golden():
    return torch.load(GOLDEN / "twm_networks.pt", weights_only=True)


@pytest.fixture(scope="module")
def twm_models(twm_golden):
    args = replace(
        twm.Args(),
        obs_channels=8,
        z_categoricals=8,
        z_classes=8,
        dyn_embed_dim=32,
        dyn_heads=2,
        dyn_head_dim=16,
        dyn_layers=2,
        dyn_ff_dim=64,
        dyn_head_layers=2,
        dyn_z_head_dim=64,
        dyn_head_dim_rg=32,
        ac_hidden_dim=64,
        ac_layers=2,
        dyn_dropout=0.0,
        obs_entropy_threshold=0.7,
    )
    obs_model, dyn = twm.ObservationModel(args, 4), twm.DynamicsModel(args, 6)
    actor, critic = twm.mlp(64, 64, 6, 2), twm.mlp(64, 64, 1, 2)
    world = official_weights(twm_golden, "world_model")
    enc, dec, net = "obs_model.encoder.", "obs_model.decoder.", "dyn_model.prediction_net."
    pairs = [
        *[(f"encoder.{i}", f"{enc}0.conv{n}") for n, i in enumerate((0, 2, 4, 6), 1)],
        *[(f"encoder.{i}", f"{enc}2.linear{n}") for n, i in enumerate((9, 11, 13), 1)],
        ("decoder.0", f"{dec}0.linear1"),
        *[(f"decoder.{i}", f"{dec}2.conv_transpose{n}") for n, i in enumerate((3, 5, 7, 9), 1)],
    ]
    load_mapped(obs_model, world, [(f"{o}.{p}", f"{s}.{p}") for o, s in pairs for p in ("weight", "bias")])
    mapping = [
        ("embed_z.0.weight", f"{net}embeds.z.linear1.weight"),
        ("embed_z.0.bias", f"{net}embeds.z.linear1.bias"),
        ("embed_a.weight", f"{net}embeds.a.weight"),
        ("embed_r.0.weight", f"{net}embeds.r.linear1.weight"),
        ("embed_r.0.bias", f"{net}embeds.r.linear1.bias"),
        ("transformer.u", f"{net}transformer.u_bias"),
        ("transformer.v", f"{net}transformer.v_bias"),
    ]
    for i in range(2):
        layer, official = f"transformer.layers.{i}.", f"{net}transformer.layers.{i}."
        mapping += [
            (f"{layer}attn.{o}.weight", f"{official}self_attn.{s}_proj.weight")
            for o, s in (("qkv", "qkv"), ("pos", "pos"), ("out", "out"))
        ]
        mapping += [
            (f"{layer}{o}.{p}", f"{official}{s}.{p}")
            for o, s in (("ff.0", "linear1"), ("ff.3", "linear2"), ("norm1", "norm1"), ("norm2", "norm2"))
            for p in ("weight", "bias")
        ]
    for ours, official in (("z_head", "z"), ("reward_head", "r"), ("discount_head", "g")):
        mapping += [
            (f"{ours}.{i}.{p}", f"{net}out_heads.{official}.linear{n}.{p}")
            for n, i in enumerate((1, 4, 7), 1)
            for p in ("weight", "bias")
        ]
    load_mapped(dyn, world, mapping)
    close(dyn.transformer.rel_enc[:53], world[f"{net}transformer.pos_enc.encodings"], atol=1e-6, rtol=0)
    heads = official_weights(twm_golden, "actor_critic")
    for module, name in ((actor, "actor_model"), (critic, "critic_model")):
        load_mapped(
            module,
            heads,
            [
                (f"{i}.{p}", f"{name}.linear{n}.{p}")
                for n, i in enumerate((0, 2, 4), 1)
                for p in ("weight", "bias")
            ],
        )
    return args, obs_model.eval(), dyn.eval(), actor, critic


def test_twm_observation_model(twm_golden, twm_models):
    _, obs_model, _, _, _ = twm_models
    stored = twm_golden["obs_model"]
    log_q = obs_model.encode(stored["frames"])
    close(log_q, stored["encoder_log_probs"])
    close(-(log_q.exp() * log_q).sum((-2, -1)), stored["encoder_entropy"])
    close(obs_model.decode(stored["decoder_z"]), stored["decoder_mean"])


def test_twm_dynamics_training_path(twm_golden, twm_models):
    _, _, dyn, _, _ = twm_models
    s = twm_golden["dyn_train"]
    dones = s["terminated"] | s["truncated"]
    with torch.no_grad():
        h = dyn(s["z"], s["a"], s["r"][:, :-1], dones[:, :-1])
        log_p, reward, discount_logit = dyn.predict(h)
    close(h, s["h"])
    close(log_p[:, :-1].exp(), s["z_hat_probs"])  # predictions from positions 0..15
    close(log_p[:, 1:], s["z_logits"])  # the official z_dist: positions 1..16
    close(reward[:, 1:], s["r_pred"])
    close(discount_logit[:, 1:], s["g_logits"])
    close(torch.sigmoid(discount_logit[:, 1:]), s["g_pred"])
    close(0.99 * (~s["terminated"]).float(), s["g"])


def test_twm_imagination_cached_path(twm_golden, twm_models):
    """The official imagination's h, ẑ, r̂, γ̂ through our memory, fed the stored actions and z
    (teacher-forced)."""
    _, _, dyn, _, _ = twm_models
    s = twm_golden["imagine"]
    with torch.no_grad():
        memory = dyn.start(s["start_z"][:, 0], s["start_a"][:, 0])
        reward, z = s["start_r"][:, 0], s["start_z"][:, 1]
        reward_eid = torch.zeros(3, dtype=torch.long)
        eid = reward_eid + (s["start_terminated"] | s["start_truncated"])[:, 0].long()
        for t in range(15):
            h, memory = dyn.step(reward, z, s["a"][:, t], reward_eid, eid, memory)
            log_p, reward, discount_logit = dyn.predict(h)
            close(h, s["h"][:, t + 1])
            close(log_p, s["z_logits"][:, t])
            close(reward, s["r"][:, t])
            close(torch.sigmoid(discount_logit), s["g"][:, t])
            z = s["z"][:, t + 1]
            reward_eid, eid = eid, eid + s["d"][:, t].long()
    cumulative, weights, ends = torch.ones(3), [], []  # the official restart rule on the stored γ̂
    for t in range(15):
        weights.append(cumulative)
        cumulative = cumulative * s["g"][:, t]
        ends.append(cumulative < 0.1)
        cumulative = torch.where(ends[-1], 1.0, cumulative)
    assert torch.equal(torch.stack(ends, 1), s["d"])
    close(torch.stack(weights, 1), s["weights"])


def test_twm_actor_critic_and_returns(twm_golden, twm_models):
    args, _, _, actor, critic = twm_models
    s, metrics = twm_golden["ac"], twm_golden["ac"]["optimize_metrics"]
    im = twm_golden["imagine"]
    with torch.no_grad():
        close(actor(s["x"]), s["logits"])
        values = critic(s["x"]).squeeze(-1)
        close(values, s["values"])
        advantages = twm.lambda_advantages(im["r"], values, im["g"] * (~im["d"]), args.lambda_)
        close(advantages, s["advantages"])
        close(advantages + values[:, :-1], s["returns"])
    rollout = (im["z"], im["a"], im["r"], im["g"], im["d"], im["weights"])
    losses = twm.actor_critic_losses(actor, critic, rollout, args)
    assert float(losses["actor"].detach()) == pytest.approx(metrics["actor_loss"], abs=1e-6)
    assert float(losses["policy_entropy"]) == pytest.approx(metrics["norm_ent"], abs=1e-6)
    # deviation: our critic loss drops the Gaussian's ½ln2π, which the official adds at every weighted step
    assert float(losses["critic"].detach()) + HALF_LOG_2PI * float(im["weights"].mean()) == pytest.approx(
        metrics["critic_loss"], abs=1e-6
    )


def test_twm_world_model_loss(twm_golden, twm_models, monkeypatch):
    args, obs_model, dyn, _, _ = twm_models
    s, official = twm_golden["wm_loss"], twm_golden["wm_loss"]["official_metrics"]
    samples = iter([s["context_z"], s["z"]])  # the official loss call's two samples, in its order
    monkeypatch.setattr(twm, "sample_z", lambda log_q: next(samples))
    losses, z_in, _ = twm.world_model_losses(
        obs_model, dyn, (s["frames"], s["a"], s["r"], s["terminated"], s["truncated"]), args
    )
    close(dyn(z_in, s["a"], s["r"][:, :-1], (s["terminated"] | s["truncated"])[:, :-1]), s["h"])
    value = {name: float(loss.detach()) for name, loss in losses.items()}
    # deviation: the pixel and reward Gaussians drop their ½ln2π constants (16384 pixels per stack;
    # coefficient 10)
    assert value["decoder"] + 16384 * HALF_LOG_2PI == pytest.approx(official["dec_loss"], rel=1e-6)
    assert value["reward"] + 10 * HALF_LOG_2PI == pytest.approx(official["reward_loss"], abs=1e-5)
    assert value["discount"] == pytest.approx(official["discount_loss"], abs=1e-5)
    assert value["entropy_hinge"] == pytest.approx(official["z_entropy_loss"], abs=1e-6)
    assert value["consistency"] == pytest.approx(official["enc_prior_loss"], abs=1e-6)
    # deviation: the official dynamics loss at HEAD is reward + discount only; the next-z term it skips is
    # ours
    assert official["dyn_loss"] == pytest.approx(
        official["reward_loss"] + official["discount_loss"], abs=1e-4
    )
    assert value["next_z"] == pytest.approx(twm_golden["wm_loss"]["next_z_by_hand"]["z_pred_loss"], abs=1e-5)


def test_twm_function_level_fixtures(monkeypatch):
    g = np.load(GOLDEN / "twm_lambda_returns.npz")
    r, discounts, values = (torch.as_tensor(g[k]) for k in ("r", "g", "values"))
    advantages = twm.lambda_advantages(r, values, discounts * ~torch.as_tensor(g["d"]), float(g["lam"]))
    close(advantages, torch.as_tensor(g["advantages"]))
    close(advantages + values[:, :-1], torch.as_tensor(g["returns"]))

    g = np.load(GOLDEN / "twm_actor_loss.npz")
    for case in (
        "broad",
        "peaked",
    ):  # an actor that outputs the stored logits; zero values, so A = the rewards
        logits = torch.as_tensor(g[f"{case}_logits"])
        args = replace(
            twm.Args(), actor_entropy_coef=float(g["coef"]), actor_entropy_threshold=float(g["threshold"])
        )
        rollout = (
            torch.zeros(4, 16, 1),
            torch.as_tensor(g[f"{case}_a"]),
            torch.as_tensor(g["advantages"]),
            torch.zeros(4, 15),
            torch.zeros(4, 15, dtype=torch.bool),
            torch.as_tensor(g[f"{case}_weights"]),
        )
        losses = twm.actor_critic_losses(
            lambda z: logits, lambda z: torch.zeros(*z.shape[:2], 1), rollout, args
        )
        assert float(losses["actor"].detach()) == pytest.approx(float(g[f"{case}_loss"]), abs=1e-6)
        assert float(losses["policy_entropy"]) == pytest.approx(float(g[f"{case}_norm_ent"]), abs=1e-6)

    g = np.load(GOLDEN / "twm_critic_loss.npz")
    values, returns, weights = (torch.as_tensor(g[k]) for k in ("values", "returns", "weights"))
    rollout = (
        torch.zeros(4, 16, 1),
        torch.zeros(4, 15, dtype=torch.long),
        returns,
        torch.zeros(4, 15),
        torch.zeros(4, 15, dtype=torch.bool),
        weights,
    )  # zero discounts: the λ-return is the reward

    def critic(z):  # the stored values, and V = 0 after the horizon
        return F.pad(values, (0, 1))[..., None]

    def actor(z):  # uniform logits over 6 actions
        return torch.zeros(*z.shape[:2], 6)

    losses = twm.actor_critic_losses(actor, critic, rollout, twm.Args())
    assert float(losses["critic"].detach()) + HALF_LOG_2PI * float(weights.mean()) == pytest.approx(
        float(g["loss"]), abs=1e-6
    )

    g = np.load(GOLDEN / "twm_visit_probs.npz")
    replay = twm.Replay(
        capacity=70, frame_shape=(1, 64, 64), stack=4, temperature=float(g["temperature"]), seed=0
    )
    replay.size, replay.visits[1:51] = 50 + 16, g["visits"]  # starts 1..50 for sequences of 16
    np.testing.assert_allclose(replay.start_probabilities(16)[1], g["probs"], atol=1e-7)

    g = np.load(
        GOLDEN / "twm_train_mask.npz"
    )  # which of 50 training tokens (z, a, r per step) each token may not see
    args = replace(
        twm.Args(),
        z_categoricals=8,
        z_classes=8,
        dyn_layers=1,
        dyn_embed_dim=32,
        dyn_heads=2,
        dyn_head_dim=16,
        dyn_ff_dim=64,
        dyn_z_head_dim=64,
        dyn_head_dim_rg=32,
        dyn_dropout=0.0,
    )
    dyn, masks = twm.DynamicsModel(args, 3).eval(), []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(
        twm.F,
        "scaled_dot_product_attention",
        lambda *a, attn_mask, **k: masks.append(attn_mask) or original(*a, attn_mask=attn_mask, **k),
    )
    dones = torch.as_tensor(g["stop_mask"])
    with torch.no_grad():
        dyn(
            torch.zeros(3, 17, args.z_categoricals * args.z_classes),
            torch.zeros(3, 17, dtype=torch.long),
            torch.zeros(3, 16),
            dones,
        )
    blocked = torch.isinf(masks[0][:, 0]).permute(1, 2, 0)  # (query, key, batch) as stored
    assert torch.equal(blocked, torch.as_tensor(g["mask_true_means_blocked"]))


# ---- IRIS --------------------------------------------------------------------------------------------------
def tokenizer_mapping(tokenizer, args):
    """(our name, official name) pairs, walking our Sequential encoder and decoder in the official forward
    order."""

    def block_names(module, official):
        if isinstance(module, iris.ResnetBlock):
            pairs = [("net.0", "norm1"), ("net.2", "conv1"), ("net.3", "norm2"), ("net.5", "conv2")]
            return pairs + ([("skip", "nin_shortcut")] if isinstance(module.skip, torch.nn.Conv2d) else [])
        if isinstance(module, iris.AttnBlock):
            return [("norm", "norm"), ("qkv", ("q", "k", "v")), ("proj_out", "proj_out")]
        return (
            [("1", "conv")] if isinstance(module, torch.nn.Sequential) else [("", "")]
        )  # Down/Upsample, or a layer

    levels = len(args.tok_ch_mult)
    encoder = ["conv_in"]
    for i in range(levels):
        for j in range(args.tok_num_res_blocks):
            encoder += [f"down.{i}.block.{j}"] + [f"down.{i}.attn.{j}"] * (
                64 >> i in args.tok_attn_resolutions
            )
        encoder += [f"down.{i}.downsample"] * (i < levels - 1)
    encoder += ["mid.block_1", "mid.attn_1", "mid.block_2", "norm_out", None, "conv_out"]
    decoder = ["conv_in", "mid.block_1", "mid.attn_1", "mid.block_2"]
    for i in reversed(range(levels)):
        for j in range(args.tok_num_res_blocks + 1):
            decoder += [f"up.{i}.block.{j}"] + [f"up.{i}.attn.{j}"] * (64 >> i in args.tok_attn_resolutions)
        decoder += [f"up.{i}.upsample"] * (i > 0)
    decoder += ["norm_out", None, "conv_out"]
    pairs = []
    for part, names in (("encoder", encoder), ("decoder", decoder)):
        modules = list(getattr(tokenizer, part))
        assert len(modules) == len(names)
        for index, (module, official) in enumerate(zip(modules, names)):
            for ours, theirs in block_names(module, official) if official else []:
                prefix, source = f"{part}.{index}" + (f".{ours}" if ours else ""), f"{part}.{official}"
                for p in ("weight", "bias"):
                    if isinstance(
                        theirs, tuple
                    ):  # our fused q, k, v: official q, k, v stacked on the output channels
                        pairs.append(
                            (
                                f"{prefix}.{p}",
                                lambda w, s=source, t=theirs, p=p: torch.cat([w[f"{s}.{x}.{p}"] for x in t]),
                            )
                        )
                    else:
                        pairs.append(
                            (f"{prefix}.{p}", f"{source}" + (f".{theirs}" if theirs else "") + f".{p}")
                        )
    return (
        pairs
        + [
            (f"{q}.{p}", f"{q}.{p}")
            for q in ("pre_quant_conv", "post_quant_conv")
            for p in ("weight", "bias")
        ]
        + [("codebook.weight", "embedding.weight")]
    )


@pytest.fixture(scope="module")
def iris_golden():
    return torch.load(GOLDEN / "iris_networks.pt", weights_only=True)


@pytest.fixture(scope="module")
def iris_models(iris_golden):
    args = replace(
        iris.Args(),
        tok_ch=32,
        tok_ch_mult=(1, 1, 2, 2, 1),
        tok_num_res_blocks=1,
        tok_attn_resolutions=(8, 16),
        tok_z_channels=64,
        tok_vocab_size=64,
        tok_embed_dim=32,
        wm_num_layers=2,
        wm_num_heads=4,
        wm_embed_dim=64,
        wm_dropout=0.1,
        wm_sequence_length=4,
        imagine_horizon=4,
        burn_in=3,
    )
    tokenizer, world_model = iris.Tokenizer(args), iris.WorldModel(args, 5)
    actor_critic = iris.ActorCritic(5, 512, (32, 32, 64, 64))
    load_mapped(tokenizer, official_weights(iris_golden, "tokenizer"), tokenizer_mapping(tokenizer, args))
    mapping = [
        ("obs_emb.weight", "embedder.embedding_tables.1.weight"),  # table 0 is the action table
        ("act_emb.weight", "embedder.embedding_tables.0.weight"),
        ("pos_emb.weight", "pos_emb.weight"),
        *[(f"ln_f.{p}", f"transformer.ln_f.{p}") for p in ("weight", "bias")],
    ]
    for i in range(2):
        ours, theirs = f"blocks.{i}.", f"transformer.blocks.{i}."
        mapping += [
            (f"{ours}{o}.{p}", f"{theirs}{t}.{p}")
            for o, t in (
                ("ln1", "ln1"),
                ("ln2", "ln2"),
                ("attn.proj", "attn.proj"),
                ("mlp.0", "mlp.0"),
                ("mlp.2", "mlp.2"),
            )
            for p in ("weight", "bias")
        ]
        mapping += [
            (
                f"{ours}attn.qkv.{p}",
                lambda w, t=theirs, p=p: torch.cat(
                    [w[f"{t}attn.{x}.{p}"] for x in ("query", "key", "value")]
                ),
            )
            for p in ("weight", "bias")
        ]
    mapping += [
        (f"{o}.{i}.{p}", f"{t}.head_module.{i}.{p}")
        for o, t in (
            ("head_obs", "head_observations"),
            ("head_reward", "head_rewards"),
            ("head_end", "head_ends"),
        )
        for i in (0, 2)
        for p in ("weight", "bias")
    ]
    load_mapped(world_model, official_weights(iris_golden, "world_model"), mapping)
    mapping = [
        (f"cnn.{i}.{p}", f"conv{n}.{p}") for n, i in enumerate((0, 3, 6, 9), 1) for p in ("weight", "bias")
    ]
    mapping += [(f"lstm.{p}", f"lstm.{p}") for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    mapping += [(f"{o}.{p}", f"{o}_linear.{p}") for o in ("actor", "critic") for p in ("weight", "bias")]
    load_mapped(actor_critic, official_weights(iris_golden, "actor_critic"), mapping)
    return args, tokenizer.eval(), world_model.eval(), actor_critic.eval()


def test_iris_tokenizer(iris_golden, iris_models):
    args, tokenizer, _, _ = iris_models
    s = iris_golden["tokenizer"]
    with torch.no_grad():
        tokens, z, z_q = tokenizer.encode(s["frames"])
        assert torch.equal(tokens, s["tokens"])
        close(z, s["z"])
        close(z_q, s["z_quantized"])
        close(tokenizer.decode_latent(z_q), s["decoded"], atol=5e-5)
        _, parts = iris.tokenizer_loss(tokenizer, s["frames"], args.tok_beta)
        assert float(parts["codebook"] + parts["commitment"]) == pytest.approx(s["commitment_loss"], abs=1e-6)
        # deviation: we train with Delta-IRIS's L1 + L2 + max recipe instead of L1 + LPIPS; the official L1
        # term:
        x = s["frames"].float() / 255 * 2 - 1
        l1 = (tokenizer.decode_latent(iris.straight_through(z, z_q)) - x).abs().mean()
        assert float(l1) == pytest.approx(s["reconstruction_loss"], abs=1e-6)


def test_iris_world_model_full_and_cached(iris_golden, iris_models):
    _, _, world_model, _ = iris_models
    s = iris_golden["world_model"]
    with torch.no_grad():
        obs, reward, end = world_model(s["tokens"])
        close(obs, s["logits_observations"])
        close(reward, s["logits_rewards"])
        close(end, s["logits_ends"])
        cache = world_model.new_cache(3)
        outputs = [world_model(s["tokens"][:, :16], cache)] + [
            world_model(s["tokens"][:, t : t + 1], cache) for t in range(16, 68)
        ]
    close(torch.cat([o[0] for o in outputs], 1), s["logits_observations"])
    close(torch.cat([o[1] for o in outputs], 1), s["logits_rewards"])


def test_iris_world_model_loss(iris_golden, iris_models):
    _, tokenizer, world_model, _ = iris_models
    s = iris_golden["world_model_loss"]
    mask = s["mask_padding"]
    with torch.no_grad():
        tokens = tokenizer.encode_real(s["observations"], mask)
        assert torch.equal(tokens[mask], s["obs_tokens"][mask])
        labels = iris.world_model_labels(tokens, s["rewards"], s["ends"], mask)
        for ours, theirs in zip(labels, ("observations", "rewards", "ends")):
            assert torch.equal(ours.flatten(), s[f"labels_{theirs}"])
        total, parts = iris.world_model_loss(world_model, tokens, s["actions"], s["rewards"], s["ends"], mask)
    for ours, theirs in (("obs", "loss_obs"), ("reward", "loss_rewards"), ("end", "loss_ends")):
        assert float(parts[ours]) == pytest.approx(s[theirs], abs=1e-5)
    assert float(total) == pytest.approx(s["loss_total"], abs=1e-5)


def test_iris_actor_critic_burn_in(iris_golden, iris_models):
    _, _, _, actor_critic = iris_models
    s = iris_golden["actor_critic"]
    frames = s["frames"].float() / 255
    with torch.no_grad():
        h, c = actor_critic.burn_in(frames[:, :3], s["mask_padding"][:, :3])
        close(h, s["hx_after_burn_in"])
        close(c, s["cx_after_burn_in"])
        logits, value, (h, c) = actor_critic(frames[:, 3], (h, c))
    close(logits, s["logits_actions"])
    close(value, s["means_values"])
    close(h, s["hx"])
    close(c, s["cx"])


def test_iris_seeded_imagination_and_loss(iris_golden, iris_models):
    args, tokenizer, world_model, actor_critic = iris_models
    frames, mask = iris_golden["actor_critic"]["frames"], iris_golden["actor_critic"]["mask_padding"]
    s = iris_golden["imagination"]
    with torch.no_grad():
        tokens = tokenizer.encode_real(frames, mask)
    assert torch.equal(tokens[:, :3][mask[:, :3]], s["burn_in_tokens"][mask[:, :3]])
    assert torch.equal(tokens[:, -1], s["initial_obs_tokens"])
    torch.manual_seed(s["seed"])
    imagined = iris.imagine(tokenizer, world_model, actor_critic, tokens, mask, s["horizon"])
    assert torch.equal(imagined["rewards"], s["rewards"].float())
    assert torch.equal(imagined["ends"], s["ends"].float())
    close(imagined["values"], s["values"])
    log_probs = torch.log_softmax(s["logits_actions"], -1).gather(-1, s["actions"][..., None]).squeeze(-1)
    close(imagined["log_probs"], log_probs)
    _, parts = iris.actor_critic_loss(imagined, args.gamma, args.lam, args.entropy_coef, mask_after_end=False)
    for ours, theirs in (("actor", "loss_actions"), ("critic", "loss_values"), ("entropy", "loss_entropy")):
        assert float(parts[ours].detach()) == pytest.approx(s[theirs], abs=1e-6)


def test_iris_lambda_returns_fixture():
    g = np.load(GOLDEN / "iris_lambda_returns.npz")
    returns = iris.lambda_returns(
        *(torch.as_tensor(g[k]) for k in ("rewards", "values", "ends")), float(g["gamma"]), float(g["lam"])
    )
    close(returns, torch.as_tensor(g["returns"]))


def test_mapping_errors_are_caught(twm_golden, twm_models):
    """The tests can fail: norm1 and norm2 swapped in one layer moves h far beyond the tolerance."""
    _, _, dyn, _, _ = twm_models
    s = twm_golden["dyn_train"]
    layer = dyn.transformer.layers[0]
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.norm1.load_state_dict(saved_norm(saved, "norm2"))
    layer.norm2.load_state_dict(saved_norm(saved, "norm1"))
    try:
        with torch.no_grad():
            h = dyn(s["z"], s["a"], s["r"][:, :-1], (s["terminated"] | s["truncated"])[:, :-1])
        assert (h - s["h"]).abs().max() > 0.1
    finally:
        layer.load_state_dict(saved)


def saved_norm(state, name):
    return {re.sub(rf"^{name}\.", "", k): v for k, v in state.items() if k.startswith(f"{name}.")}
