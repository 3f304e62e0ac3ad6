"""policy_loss / kl_divergence / aggregate_loss against NumPy references written from the papers."""

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from grpo_jax import aggregate_loss, aggregation_denominator, kl_divergence, policy_loss, rollout_correction

AGGREGATIONS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------- NumPy references


def ref_kl(logprobs, ref_logprobs, estimator):
    log_r = np.float64(ref_logprobs) - np.float64(logprobs)  # log(pi_ref / pi_theta)
    return {"k1": -log_r, "k2": log_r**2 / 2, "k3": np.exp(log_r) - log_r - 1}[estimator]


def ref_aggregate(per_token, mask, mode, max_completion_length=None):
    rows = [i for i in range(mask.shape[0]) if mask[i].any()]
    if not rows:
        return 0.0
    if mode == "seq-mean-token-mean":  # DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t
        return np.mean([np.mean(per_token[i][mask[i]]) for i in rows])
    if mode == "token-mean":  # DAPO eq. 8: 1/sum|o_i| sum_i sum_t
        return np.sum(per_token[mask]) / mask.sum()
    length = max_completion_length or mask.shape[1]  # Dr. GRPO: constant normaliser
    return np.sum(per_token[mask]) / (len(rows) * length)


def ref_policy_loss(lp, old, adv, mask, ref=None, beta=0.0, kl_estimator="k3", epsilon=0.2,
                    epsilon_high=None, dual_clip=None, loss_type="grpo",
                    aggregation="seq-mean-token-mean", max_completion_length=None):
    """Token by token in float64, straight from the formulas in the policy_loss docstring."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    per_token = np.zeros(lp.shape)
    for i, t in itertools.product(*map(range, lp.shape)):
        if not mask[i, t]:
            continue
        a = adv[i] if adv.ndim == 1 else adv[i, t]
        if loss_type == "gspo":  # sequence ratio s_i = exp(1/|o_i| sum_t log r_it)
            ratio = np.exp(np.mean(lp[i][mask[i]] - old[i][mask[i]]))
        else:
            ratio = np.exp(lp[i, t] - old[i, t])
        clipped = min(max(ratio, 1 - epsilon), 1 + eps_high)
        if loss_type == "cispo":
            objective = clipped * a * lp[i, t]
        else:
            objective = min(ratio * a, clipped * a)
            if dual_clip is not None and a < 0:
                objective = max(objective, dual_clip * a)
        per_token[i, t] = -objective
        if beta:
            per_token[i, t] += beta * ref_kl(lp[i, t], ref[i, t], kl_estimator)
    return ref_aggregate(per_token, mask, aggregation, max_completion_length)


def make_batch(seed, batch=6, length=9, token_advantages=False):
    """Ratios spread across the clip range, ragged masks (one empty row), garbage where masked."""
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.05, 3.0, (batch, length))
    old = lp + rng.normal(0, 0.5, (batch, length))
    ref = lp + rng.normal(0, 0.5, (batch, length))
    adv = rng.normal(size=(batch, length) if token_advantages else batch)
    lengths = rng.integers(1, length + 1, batch)
    lengths[2] = 0
    mask = np.arange(length)[None] < lengths[:, None]
    for x in (lp, old, ref):
        x[~mask] = np.nan
    if token_advantages:
        adv[~mask] = np.inf
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v
            for k, v in dict(lp=lp, old=old, ref=ref, adv=adv, mask=mask).items()}


def run(batch, **options):
    ref = jnp.asarray(batch["ref"]) if options.get("beta", 0.0) else None
    return policy_loss(jnp.asarray(batch["lp"]), jnp.asarray(batch["old"]), jnp.asarray(batch["adv"]),
                       jnp.asarray(batch["mask"]), ref_logprobs=ref, **options)


def run_ref(batch, **options):
    return ref_policy_loss(np.float64(batch["lp"]), np.float64(batch["old"]), np.float64(batch["adv"]),
                           batch["mask"], ref=np.float64(batch["ref"]), **options)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_reference(estimator):
    b = make_batch(0)
    m = b["mask"]
    got = np.asarray(kl_divergence(jnp.asarray(b["lp"][m]), jnp.asarray(b["ref"][m]), estimator))
    np.testing.assert_allclose(got, ref_kl(b["lp"][m], b["ref"][m], estimator), rtol=1e-5, atol=1e-6)


def test_kl_known_values():
    lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))  # pi_ref / pi = 0.5
    assert float(kl_divergence(lp, ref, "k1")[0]) == pytest.approx(np.log(2), rel=1e-6)
    assert float(kl_divergence(lp, ref, "k2")[0]) == pytest.approx(np.log(2) ** 2 / 2, rel=1e-6)
    assert float(kl_divergence(lp, ref, "k3")[0]) == pytest.approx(0.5 + np.log(2) - 1, rel=1e-5)
    # k3 is an f-divergence estimator: >= 0 everywhere, 0 iff equal.
    x = jnp.linspace(-5, 5, 101)
    assert float(kl_divergence(x, jnp.zeros_like(x), "k3").min()) >= 0.0
    assert float(kl_divergence(x, x, "k3").max()) == 0.0


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_matches_reference(mode):
    b = make_batch(1)
    values = np.where(b["mask"], b["lp"], np.nan)
    got = float(aggregate_loss(jnp.asarray(values), jnp.asarray(b["mask"]), mode))
    assert got == pytest.approx(ref_aggregate(np.float64(values), b["mask"], mode), rel=1e-5)
    assert float(aggregate_loss(jnp.ones((2, 3)), jnp.zeros((2, 3), bool), mode)) == 0.0


def test_aggregation_known_values():
    x = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    m = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
    assert float(aggregate_loss(x, m, "seq-mean-token-mean")) == pytest.approx((1 + 4) / 2)
    assert float(aggregate_loss(x, m, "token-mean")) == pytest.approx(8 / 5)
    assert float(aggregate_loss(x, m, "seq-mean-token-sum-norm")) == pytest.approx(8 / (2 * 4))
    assert float(aggregate_loss(x, m, "seq-mean-token-sum-norm", 16)) == pytest.approx(8 / (2 * 16))


POLICY_CASES = [
    dict(),
    dict(epsilon=0.1),
    dict(epsilon_high=0.28),
    dict(dual_clip=3.0, epsilon=0.1),
    dict(loss_type="gspo", epsilon=3e-2, epsilon_high=4e-2),
    dict(loss_type="cispo", epsilon=1.0, epsilon_high=0.28),
    dict(beta=0.04, kl_estimator="k1"),
    dict(beta=0.04, kl_estimator="k2"),
    dict(beta=0.1, kl_estimator="k3"),
    dict(loss_type="gspo", beta=0.1, aggregation="token-mean"),
    dict(loss_type="cispo", beta=0.1, aggregation="seq-mean-token-sum-norm"),
]


@pytest.mark.slow
@pytest.mark.parametrize("token_advantages", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("options", POLICY_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_policy_loss_matches_reference(options, aggregation, token_advantages):
    options = {"aggregation": aggregation, **options}
    for seed in range(3):
        b = make_batch(seed, token_advantages=token_advantages)
        loss, metrics = run(b, **options)
        want = run_ref(b, **options)
        assert float(loss) == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert float(metrics["loss"]) == float(loss)
        assert np.isfinite(float(loss))


def test_policy_loss_seq_sum_norm_with_max_length():
    b = make_batch(4)
    options = dict(aggregation="seq-mean-token-sum-norm", max_completion_length=32)
    assert float(run(b, **options)[0]) == pytest.approx(run_ref(b, **options), rel=1e-4)


def numeric_grad(fn, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (fn(plus) - fn(minus)) / (2 * h)
    return grad


@pytest.mark.parametrize("options", [
    dict(),
    dict(epsilon_high=0.28, aggregation="token-mean"),
    dict(dual_clip=2.0, epsilon=0.1),
    dict(loss_type="gspo", epsilon=0.05),
    dict(beta=0.1, kl_estimator="k3", aggregation="seq-mean-token-sum-norm"),
    dict(beta=0.1, kl_estimator="k2"),
], ids=str)
def test_gradient_matches_finite_differences_of_reference(options):
    b = make_batch(5, batch=4, length=5)
    m = b["mask"]
    got = np.asarray(jax.grad(lambda lp: run({**b, "lp": lp}, **options)[0])(jnp.asarray(b["lp"])))
    lp64 = np.where(m, np.float64(b["lp"]), 0.0)
    want = numeric_grad(lambda lp: run_ref({**b, "lp": lp}, **options), lp64)
    np.testing.assert_allclose(np.where(m, got, 0.0), want, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(got[~m], 0.0)


def test_cispo_gradient_keeps_clipped_tokens():
    """CISPO: d/d logp_t of -sg(clip(r_t)) A_t logp_t is -clip(r_t) A_t / N on every token, clipped or not."""
    b = make_batch(6)
    m = b["mask"]
    options = dict(loss_type="cispo", epsilon=0.1, epsilon_high=0.1, aggregation="token-mean")
    got = np.asarray(jax.grad(lambda lp: run({**b, "lp": lp}, **options)[0])(jnp.asarray(b["lp"])))
    ratio = np.exp(np.float64(b["lp"]) - b["old"])
    weight = np.clip(ratio, 0.9, 1.1)
    want = np.where(m, -weight * b["adv"][:, None] / m.sum(), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    clipped = m & ((ratio > 1.1) | (ratio < 0.9))
    assert clipped.any() and np.all(got[clipped] != 0)


def test_metrics_match_reference():
    b = make_batch(7)
    m = b["mask"]
    options = dict(epsilon=0.1, epsilon_high=0.2, dual_clip=1.5, beta=0.05)
    _, metrics = run(b, **options)
    ratio = np.exp(np.float64(b["lp"][m]) - b["old"][m])
    adv = np.broadcast_to(b["adv"][:, None], m.shape)[m]
    low = (ratio < 0.9) & (adv < 0)
    high = (ratio > 1.2) & (adv > 0)
    expected = dict(
        clip_fraction_low=low.mean(), clip_fraction_high=high.mean(), clip_fraction=(low | high).mean(),
        dual_clip_fraction=((ratio > 1.5) & (adv < 0)).mean(), ratio_mean=ratio.mean(),
        ratio_min=ratio.min(), ratio_max=ratio.max(), num_tokens=m.sum(),
        kl=ref_kl(b["lp"][m], b["ref"][m], "k3").mean(),
        approx_kl=ref_kl(b["old"][m], b["lp"][m], "k3").mean(),
        pg_loss=run_ref(b, **{**options, "beta": 0.0}),
    )
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-7), name
    assert low.any() and high.any()


# ----------------------------------------------------------------------------- properties


@given(st.integers(0, 10_000), st.sampled_from(AGGREGATIONS), st.sampled_from(["grpo", "gspo", "cispo"]),
       st.booleans(), st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -7.0]))
def test_masked_tokens_never_affect_loss_or_gradient(seed, aggregation, loss_type, token_adv, garbage):
    b = make_batch(seed, token_advantages=token_adv)
    m = b["mask"]
    options = dict(aggregation=aggregation, loss_type=loss_type, beta=0.05)
    if loss_type == "cispo":
        options["epsilon_high"] = 0.3

    def loss_and_grad(batch):
        fn = lambda lp: run({**batch, "lp": lp}, **options)  # noqa: E731
        (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(batch["lp"]))
        return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}

    clean = {k: np.where(m, v, 0.0).astype(v.dtype) if v.shape == m.shape else v for k, v in b.items()}
    dirty = {k: np.where(m, v, garbage).astype(v.dtype) if v.shape == m.shape and k != "mask" else v
             for k, v in b.items()}
    loss_c, grad_c, metrics_c = loss_and_grad(clean)
    loss_d, grad_d, metrics_d = loss_and_grad(dirty)
    assert loss_c == loss_d
    np.testing.assert_array_equal(grad_c, grad_d)
    np.testing.assert_array_equal(grad_d[~m], 0.0)
    assert metrics_c == metrics_d


def test_gradient_at_ratio_one_is_the_policy_gradient():
    """At pi_theta = pi_old, grad of the seq-mean-token-mean loss is
    -(1/G) sum_i (1/|o_i|) sum_t A_i grad log pi(o_it), here for a linear-softmax policy
    log pi(y | x) = (x W)_y - logsumexp(x W), with grad_W log pi(y | x) = x (onehot(y) - softmax(x W))^T."""
    rng = np.random.default_rng(8)
    batch, length, dim, vocab = 4, 6, 3, 5
    features = rng.normal(size=(batch, length, dim)).astype(np.float32)
    tokens = rng.integers(0, vocab, (batch, length))
    weights = rng.normal(size=(dim, vocab)).astype(np.float32)
    adv = rng.normal(size=batch).astype(np.float32)
    mask = np.arange(length)[None] < np.array([6, 2, 4, 1])[:, None]

    def logprobs(w):
        logp = jax.nn.log_softmax(jnp.asarray(features) @ w)
        return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], -1)[..., 0]

    def loss(w):
        lp = logprobs(w)
        return policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv), jnp.asarray(mask))[0]

    got = np.asarray(jax.grad(loss)(jnp.asarray(weights)))
    want = np.zeros((dim, vocab))
    for i in range(batch):
        for t in range(mask[i].sum()):
            x = np.float64(features[i, t])
            logits = x @ weights
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            grad_logp = np.outer(x, np.eye(vocab)[tokens[i, t]] - probs)
            want -= adv[i] * grad_logp / mask[i].sum() / batch
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- options matter


def test_every_option_changes_the_loss():
    b = make_batch(9, batch=16, length=12, token_advantages=True)
    base = dict(epsilon=0.1, beta=0.05)
    variants = {
        "epsilon": dict(epsilon=0.2),
        "epsilon_high": dict(epsilon_high=0.3),
        "dual_clip": dict(dual_clip=1.2),
        "gspo": dict(loss_type="gspo"),
        "cispo": dict(loss_type="cispo"),
        "beta": dict(beta=0.5),
        "k1": dict(kl_estimator="k1"),
        "k2": dict(kl_estimator="k2"),
        "token-mean": dict(aggregation="token-mean"),
        "seq-mean-token-sum-norm": dict(aggregation="seq-mean-token-sum-norm"),
    }
    reference = float(run(b, **base)[0])
    assert float(run(b, **base, dual_clip=1.2)[1]["dual_clip_fraction"]) > 0  # the data reach every region
    values = {"base": reference}
    for name, change in variants.items():
        values[name] = float(run(b, **{**base, **change})[0])
        assert values[name] != pytest.approx(reference, rel=1e-6), name
    sum_norm = dict(aggregation="seq-mean-token-sum-norm")
    assert float(run(b, **sum_norm, max_completion_length=50)[0]) != pytest.approx(
        float(run(b, **sum_norm)[0]))
    # Token-level and sequence-level advantages differ when they differ within a sequence.
    seq_adv = np.where(b["mask"], b["adv"], 0).sum(1) / np.maximum(b["mask"].sum(1), 1)
    assert float(run(b)[0]) != pytest.approx(float(run({**b, "adv": seq_adv.astype(np.float32)})[0]))


def test_beta_zero_needs_no_reference_and_reference_gets_no_gradient():
    b = make_batch(10)
    loss, metrics = run(b)  # beta=0, ref_logprobs=None
    assert "kl" not in metrics
    lp, ref = jnp.asarray(b["lp"]), jnp.asarray(b["ref"])
    args = (lp, jnp.asarray(b["old"]), jnp.asarray(b["adv"]), jnp.asarray(b["mask"]))
    ref_grad = jax.grad(lambda r: policy_loss(*args, ref_logprobs=r, beta=0.1)[0])(ref)
    np.testing.assert_array_equal(np.asarray(ref_grad), 0.0)
    # A reference with beta=0 is monitored (kl metric) without changing the loss.
    loss_with_ref, metrics_with_ref = policy_loss(*args, ref_logprobs=ref, beta=0.0)
    assert float(loss_with_ref) == float(loss)
    assert float(metrics_with_ref["kl"]) > 0
    # beta may be traced (a schedule): same value as the static float.
    traced = jax.jit(lambda beta: policy_loss(*args, ref_logprobs=ref, beta=beta)[0])(0.1)
    assert float(traced) == pytest.approx(float(policy_loss(*args, ref_logprobs=ref, beta=0.1)[0]), rel=1e-6)


def test_clip_higher_and_dual_clip_act_where_they_should():
    mask = jnp.ones((3, 1), bool)
    old = jnp.zeros((3, 1))
    lp = jnp.log(jnp.array([[1.25], [1.25], [4.0]]))  # ratios 1.25, 1.25, 4
    adv = jnp.array([1.0, -1.0, -1.0])
    per_seq = lambda **kw: [  # noqa: E731
        float(policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], **kw)[0]) for i in range(3)]
    assert per_seq() == pytest.approx([-1.2, 1.25, 4.0])
    # clip-higher lifts only the bound for positive advantages.
    assert per_seq(epsilon_high=0.28) == pytest.approx([-1.25, 1.25, 4.0])
    # dual clip caps the loss of negative advantages with huge ratios at c * |A|.
    assert per_seq(dual_clip=3.0) == pytest.approx([-1.2, 1.25, 3.0])


# ----------------------------------------------------------------------------- transforms, errors


def test_under_jit_grad_and_vmap():
    batches = [make_batch(s) for s in (11, 12)]
    options = dict(beta=0.04, epsilon_high=0.28, aggregation="token-mean")
    stacked = {k: jnp.stack([jnp.asarray(b[k]) for b in batches]) for k in batches[0]}

    def fn(lp, old, adv, mask, ref):
        return policy_loss(lp, old, adv, mask, ref_logprobs=ref, **options)[0]

    args = [stacked[k] for k in ("lp", "old", "adv", "mask", "ref")]
    vmapped = jax.jit(jax.vmap(fn))(*args)
    for i, b in enumerate(batches):
        assert float(vmapped[i]) == pytest.approx(float(run(b, **options)[0]), rel=1e-6)
    grads = jax.vmap(jax.grad(fn))(*args)
    np.testing.assert_allclose(grads[1], jax.grad(fn)(*[a[1] for a in args]), rtol=1e-6)
    kl = jax.vmap(lambda a, b: kl_divergence(a, b))(stacked["lp"], stacked["ref"])
    assert kl.shape == stacked["lp"].shape
    agg = jax.jit(jax.vmap(lambda x, m: aggregate_loss(x, m, "token-mean")))(stacked["old"], stacked["mask"])
    assert float(agg[0]) == pytest.approx(
        ref_aggregate(np.float64(batches[0]["old"]), batches[0]["mask"], "token-mean"), rel=1e-5)


def test_errors_name_the_field():
    b = make_batch(13)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        run(b, loss_type="ppo")
    with pytest.raises(ValueError, match="aggregation='mean'"):
        run(b, aggregation="mean")
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        run(b, kl_estimator="k4")
    with pytest.raises(ValueError, match="beta=0.1 needs ref_logprobs"):
        policy_loss(*(jnp.asarray(b[k]) for k in ("lp", "old", "adv", "mask")), beta=0.1)
    with pytest.raises(ValueError, match="dual_clip=0.5"):
        run(b, dual_clip=0.5)
    with pytest.raises(ValueError, match="dual_clip=3.0"):
        run(b, dual_clip=3.0, loss_type="cispo")
    with pytest.raises(ValueError, match="max_completion_length=8 only applies"):
        run(b, max_completion_length=8)
    with pytest.raises(ValueError, match="advantages has shape"):
        run({**b, "adv": b["adv"][:3]})


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_parts_weighted_by_their_denominator_give_the_whole_aggregate(mode):
    rng = np.random.default_rng(11)
    values = rng.normal(size=(12, 7)).astype(np.float32)
    mask = np.arange(7)[None] < rng.integers(0, 8, 12)[:, None]
    mask[3] = False  # an empty row counts in no denominator
    whole = float(aggregate_loss(values, mask, mode))
    parts = [slice(0, 3), slice(3, 8), slice(8, 12)]
    denominators = np.array([float(aggregation_denominator(mask[p], mode)) for p in parts])
    want = {"token-mean": mask.sum(), "seq-mean-token-mean": (mask.sum(1) > 0).sum(),
            "seq-mean-token-sum-norm": (mask.sum(1) > 0).sum()}[mode]
    assert denominators.sum() == want
    combined = sum(d / denominators.sum() * float(aggregate_loss(values[p], mask[p], mode))
                   for d, p in zip(denominators, parts, strict=True))
    assert combined == pytest.approx(whole, rel=1e-6)
    equal_weights = np.mean([float(aggregate_loss(values[p], mask[p], mode)) for p in parts])
    assert abs(equal_weights - whole) > 1e-3  # plain averaging of the parts would be wrong here


def test_rollout_correction_truncates_or_masks_the_importance_weight():
    """w = pi_old / pi_sampler per token: tis keeps min(w, cap), mis drops tokens with w > cap."""
    old = jnp.log(jnp.array([[0.5, 0.2, 0.9, 0.3]]))
    behaviour = jnp.log(jnp.array([[0.5, 0.4, 0.3, 0.1]]))  # w = 1, 0.5, 3, 3 (the last one off the mask)
    mask = jnp.array([[True, True, True, False]])
    tis, metrics = rollout_correction(old, behaviour, mask, mode="tis", cap=2.0)
    np.testing.assert_allclose(tis, [[1.0, 0.5, 2.0, 0.0]], rtol=1e-6)
    mis, _ = rollout_correction(old, behaviour, mask, mode="mis", cap=2.0)
    np.testing.assert_allclose(mis, [[1.0, 0.5, 0.0, 0.0]], rtol=1e-6)
    none, _ = rollout_correction(old, behaviour, mask, mode="none")
    np.testing.assert_array_equal(none, [[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(metrics["is_weight_mean"], 3.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["is_ratio_max"], 3.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["is_capped_fraction"], 1 / 3, rtol=1e-6)
    huge, metrics = rollout_correction(jnp.zeros((1, 2)), jnp.full((1, 2), -500.0), jnp.ones((1, 2), bool))
    assert np.isfinite(metrics["is_ratio_max"]) and np.all(np.asarray(huge) == 2.0)


def test_token_weights_scale_each_tokens_policy_gradient_term_only():
    rng = np.random.default_rng(0)
    logprobs = jnp.asarray(rng.normal(-1, 0.3, (4, 6)), jnp.float32)
    old = logprobs + jnp.asarray(rng.normal(0, 0.1, (4, 6)), jnp.float32)
    ref = logprobs + 0.2
    advantages = jnp.asarray(rng.normal(size=4), jnp.float32)
    mask = jnp.asarray(rng.random((4, 6)) < 0.8)
    weights = jnp.asarray(rng.uniform(0, 2, (4, 6)), jnp.float32)
    options = dict(ref_logprobs=ref, beta=0.1, aggregation="token-mean")
    weighted, m = policy_loss(logprobs, old, advantages, mask, token_weights=weights, **options)
    plain, m_plain = policy_loss(logprobs, old, advantages, mask, **options)
    ratio = jnp.exp(logprobs - old)
    surrogate = jnp.minimum(ratio * advantages[:, None], jnp.clip(ratio, 0.8, 1.2) * advantages[:, None])
    expected_pg = jnp.where(mask, -surrogate * weights, 0.0).sum() / mask.sum()
    np.testing.assert_allclose(m["pg_loss"], expected_pg, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], m_plain["kl"], rtol=1e-6)  # the KL term is not weighted
    np.testing.assert_allclose(weighted - m["pg_loss"], plain - m_plain["pg_loss"], atol=1e-6)
    grad_weights = jax.grad(lambda w: policy_loss(logprobs, old, advantages, mask, token_weights=w,
                                                  **options)[0])(weights)
    np.testing.assert_array_equal(grad_weights, 0.0)  # constants: no gradient reaches them


def test_gspo_sequence_ratio_of_a_very_stale_batch_stays_finite():
    """A sequence log-ratio of 100 (exp overflows float32 past ~88) gives a finite loss and gradient: the
    ratio is bounded at e^20, far outside the clip range, so negative advantages are clipped as before."""
    logprobs = jnp.zeros((2, 3))
    old = jnp.full((2, 3), -100.0)
    mask = jnp.ones((2, 3), bool)
    advantages = jnp.array([1.0, -1.0])

    def loss(lp):
        return policy_loss(lp, old, advantages, mask, loss_type="gspo", dual_clip=3.0)[0]

    value, grad = jax.value_and_grad(loss)(logprobs)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    _, metrics = policy_loss(logprobs, old, advantages, mask, loss_type="gspo")
    assert float(metrics["ratio_max"]) == pytest.approx(np.exp(20.0), rel=1e-5)
    unbounded = policy_loss(logprobs, old, advantages, mask, loss_type="grpo", dual_clip=3.0)[0]
    assert float(value) == pytest.approx(float(unbounded))  # the same clipped objective as token ratios
