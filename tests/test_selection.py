"""ID-Selection against hand-worked examples, an fp64 reference, and its defining properties.

Every test runs twice, once per backend: `id_select`'s default backend "auto" follows
IDSELECT_SELECTION_BACKEND, which the module fixture sets to "torch", then to "triton" (the
Triton kernel through Triton's CPU interpreter).

Kernel values used in the worked examples (gamma = 20, w = exp(-20 * (1 - cos)^2)):
    cos 1    -> w = 1            cos 0.96 -> w = 0.9685     cos 0.8 -> w = 0.4493
    cos 0.6  -> w = 0.0408       cos 0    -> w = 2.1e-9     cos <= -0.8 -> w < 1e-28
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from idselect.selection import id_select, id_select_batched, resolve_backend
from tests.triton_interpreter import selection_backend

SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module", autouse=True, params=["torch", "triton"])
def backend(request: pytest.FixtureRequest):
    with selection_backend(request.param):
        assert resolve_backend("auto", torch.device("cpu")) == request.param
        yield request.param


def select(features, scores, k, **kw) -> list[int]:
    x = torch.tensor(features, dtype=torch.float32)
    s = torch.tensor(scores, dtype=torch.float32)
    return id_select(x, s, k, **kw).tolist()


# --- hand-worked examples ---------------------------------------------------------------------

# Unit vectors in 2-D: t0 = (1, 0), t1 = (0.8, 0.6), t2 = (0, 1), t3 = (-1, 0).
# cos(t0,t1) = 0.8 (w .4493), cos(t0,t2) = 0 (w 2e-9), cos(t0,t3) = -1 (w ~0),
# cos(t1,t2) = 0.6 (w .0408), cos(t1,t3) = -0.8, cos(t2,t3) = 0.
MODES_X = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]
MODES_S = [1.0, 0.5, 0.2, 0.0]  # min 0, max 1: normalisation leaves them unchanged


def test_subtract_prefers_the_diverse_token():
    # Pick 1: t0 (1.0). Subtract w * 1.0: t1 = .5 - .4493 = .0507, t2 = .2 - 2e-9 = .2, t3 = 0.
    # Pick 2: t2 (.2), although t1 was more important before suppression.
    assert select(MODES_X, MODES_S, 2, suppression="subtract") == [0, 2]


def test_multiply_keeps_the_near_duplicate():
    # Pick 1: t0. Multiply by (1 - w): t1 = .5 * .5507 = .2753, t2 = .2 * (1 - 2e-9) = .2, t3 = 0.
    # Pick 2: t1 (.2753 > .2): multiplicative suppression is milder for low scores.
    assert select(MODES_X, MODES_S, 2, suppression="multiply") == [0, 1]


def test_modes_agree_on_the_third_pick():
    # subtract: after t2 (.2): t1 = .0507 - .0408 * .2 = .0425 > t3 = 0 -> t1.
    # multiply: after t1 (.2753): t2 = .2 * (1 - .0408) = .1918 > t3 = 0 -> t2.
    assert select(MODES_X, MODES_S, 3, suppression="subtract") == [0, 1, 2]
    assert select(MODES_X, MODES_S, 3, suppression="multiply") == [0, 1, 2]


def test_suppression_then_all_zero_falls_back_to_original_importance():
    # t0 = (1, 0), t1 = (.8, .6), t2 = (0, 1), t3 = (.6, .8); raw [11, 10, 1, 7] -> [1, .9, 0, .6].
    x = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]]
    s = [11.0, 10.0, 1.0, 7.0]
    # Pick 1: t0. t1 = .9 - .4493 = .4507; t3 = .6 - w(cos .6) = .6 - .0408 = .5592; t2 = 0.
    # Pick 2: t3 (.5592), not the more important near-duplicate t1 (top-k would take t1).
    assert select(x, s, 2) == [0, 3]
    # After t3: t1 = max(0, .4507 - .9685 * .5592) = 0 and t2 = 0: all remaining are zero.
    # Pick 3: tie at 0 -> higher original importance: t1 (10) over t2 (1).
    assert select(x, s, 3) == [0, 1, 3]


def test_tie_goes_to_original_importance_before_index():
    # t3 duplicates t0; t1, t2 orthogonal. raw [10, 0, 6, 2] -> normalised [1, 0, .6, .2].
    x = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    s = [10.0, 0.0, 6.0, 2.0]
    # Pick 1: t0. t3 = max(0, .2 - 1 * 1) = 0 (w = 1: duplicate), t1 = 0, t2 = .6 - 2e-9 = .6.
    # Pick 2: t2. Pick 3: t1 and t3 both at 0; original 2 > 0 -> t3 despite its higher index.
    for mode in ("subtract", "multiply"):
        assert select(x, s, 2, suppression=mode) == [0, 2]
        assert select(x, s, 3, suppression=mode) == [0, 2, 3]


def test_full_tie_goes_to_lower_index():
    # One-hot features (all cosines 0, w = 2e-9); raw [3, 5, 5, 3] -> [0, 1, 1, 0].
    x = torch.eye(4).tolist()
    s = [3.0, 5.0, 5.0, 3.0]
    # Pick 1: t1 and t2 tie at 1 with equal original -> t1. t2 = 1 - 2e-9 rounds to 1.0 in fp32.
    assert select(x, s, 1) == [1]
    assert select(x, s, 2) == [1, 2]
    # Pick 3: t0 and t3 tie at 0 with equal original -> lower index t0.
    assert select(x, s, 3) == [0, 1, 2]


def test_all_duplicates_follow_original_importance():
    # Every token has the same feature, so w = 1 everywhere: the first pick zeroes all others and
    # the rest come in order of original importance: t3 (4), t1 (3), t2 (2), t0 (1).
    x = [[1.0, 2.0]] * 4
    s = [1.0, 3.0, 2.0, 4.0]
    for mode in ("subtract", "multiply"):
        assert select(x, s, 1, suppression=mode) == [3]
        assert select(x, s, 2, suppression=mode) == [1, 3]
        assert select(x, s, 3, suppression=mode) == [1, 2, 3]


def test_equal_scores_normalise_to_ones_not_zeros():
    # All scores equal -> all 1. Pick t0 (index), its duplicate t1 drops to 0, t2 stays 1 -> t2.
    # (Had they normalised to 0, all would tie at 0 and t1 would follow t0.)
    assert select([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [7.0, 7.0, 7.0], 2) == [0, 2]


def test_zero_feature_vectors_count_as_orthogonal():
    # t0 and t1 are zero vectors: cosine 0 with everything (each other included), w = 2e-9.
    assert select([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], [1.0, 0.9, 0.0], 2) == [0, 1]


def test_gamma_controls_the_reach_of_suppression():
    # cos(t0, t1) = 0.8, d = 0.2. gamma = 20 -> w = .4493: t1 = .9 - .4493 = .45 < t2 = .6 -> t2.
    # gamma = 200 -> w = exp(-8) = 3e-4: t1 stays ~.9 > .6 -> t1.
    x = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]
    s = [1.0, 0.9, 0.6, 0.0]
    assert select(x, s, 2, gamma=20.0) == [0, 2]
    assert select(x, s, 2, gamma=200.0) == [0, 1]


def test_k_at_least_n_keeps_everything():
    x, s = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.0, 5.0, 1.0]
    assert select(x, s, 3) == [0, 1, 2]
    assert select(x, s, 100) == [0, 1, 2]
    assert select([[2.0]], [0.0], 1) == [0]


def test_result_is_int64_on_the_input_device():
    out = id_select(torch.randn(10, 4), torch.rand(10), 3)
    assert out.dtype == torch.int64 and out.device.type == "cpu" and out.shape == (3,)


# --- fp64 reference ---------------------------------------------------------------------------


def reference(x: torch.Tensor, s: torch.Tensor, k: int, gamma=20.0, mode="subtract") -> list[int]:
    """The spec, literally, in fp64 with Python loops."""
    n = len(s)
    if k >= n:
        return list(range(n))
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    orig = s.double()
    span = float(orig.max() - orig.min())
    cur = (orig - orig.min()) / span if span > 0 else torch.ones_like(orig)
    picked: list[int] = []
    for _ in range(k):
        alive = [j for j in range(n) if j not in picked]
        best = max(alive, key=lambda j: (float(cur[j]), float(orig[j]), -j))
        picked.append(best)
        w = torch.exp(-gamma * (1 - xn @ xn[best]) ** 2)
        cur = torch.clamp(cur - w * cur[best], min=0) if mode == "subtract" else cur * (1 - w)
    return sorted(picked)


@pytest.mark.parametrize("mode", ["subtract", "multiply"])
def test_matches_reference_on_random_inputs(mode):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(40):
        n = int(torch.randint(2, 40, (1,), generator=gen))
        d = int(torch.randint(1, 8, (1,), generator=gen))
        x = torch.randn(n, d, generator=gen)
        s = torch.rand(n, generator=gen) * 10
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        gamma = float(torch.empty(1).uniform_(1.0, 50.0, generator=gen))
        got = id_select(x, s, k, gamma=gamma, suppression=mode).tolist()
        assert got == reference(x, s, k, gamma, mode), (n, d, k, gamma)


def test_matches_reference_at_llava_size():
    gen = torch.Generator().manual_seed(7)
    x, s = torch.randn(576, 64, generator=gen), torch.rand(576, generator=gen)
    # Low-dimensional random features have plenty of close neighbours, so suppression matters.
    assert id_select(x, s, 16).tolist() == reference(x, s, 16)


# --- properties -------------------------------------------------------------------------------


@st.composite
def image(draw, max_n: int = 14, max_d: int = 5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features, scores and k; half the draws come from a coarse integer grid (many ties and
    exact duplicates), half from wide-ranging floats."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    if draw(st.booleans()):
        feats = st.integers(-2, 2).map(float)
        scores = st.integers(0, 3).map(float)
    else:
        feats = st.floats(-1e6, 1e6, width=32)
        scores = st.floats(0, 1e6, width=32)
    x = torch.tensor(draw(st.lists(feats, min_size=n * d, max_size=n * d))).reshape(n, d)
    s = torch.tensor(draw(st.lists(scores, min_size=n, max_size=n)))
    return x.float(), s.float(), draw(st.integers(1, n + 2))


@SETTINGS
@given(image(), st.sampled_from(["subtract", "multiply"]), st.floats(0.5, 100.0))
def test_output_contract(img, mode, gamma):
    x, s, k = img
    out = id_select(x, s, k, gamma=gamma, suppression=mode)
    picks = out.tolist()
    assert out.dtype == torch.int64
    assert len(picks) == min(k, len(s))
    assert picks == sorted(set(picks))  # sorted and unique
    assert all(0 <= i < len(s) for i in picks)
    if k >= len(s):
        assert picks == list(range(len(s)))


@SETTINGS
@given(st.lists(image(), min_size=1, max_size=5), st.sampled_from(["subtract", "multiply"]))
def test_batched_equals_per_image_exactly(imgs, mode):
    xs, ss, ks = zip(*imgs, strict=True)
    batched = id_select_batched(list(xs), list(ss), list(ks), suppression=mode)
    single = [id_select(x, s, k, suppression=mode) for x, s, k in imgs]
    assert [b.tolist() for b in batched] == [p.tolist() for p in single]


@SETTINGS
@given(st.data())
def test_batched_accepts_stacked_tensors(data):
    b, n, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 20)), 3
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    x = torch.randint(-2, 3, (b, n, d), generator=gen).float()  # integer grid: duplicates, ties
    s = torch.randint(0, 4, (b, n), generator=gen).float()
    ks = data.draw(st.lists(st.integers(1, n + 1), min_size=b, max_size=b))
    batched = id_select_batched(x, s, ks)
    assert [t.tolist() for t in batched] == [
        id_select(x[i], s[i], ks[i]).tolist() for i in range(b)
    ]


def pairwise_min_distance(x: torch.Tensor) -> float:
    # Exact unit rows in fp64 (only all-zero rows stay zero, as in the library): F.normalize's
    # eps would shrink a tiny row such as [0, 5e-26, 0] to ~zero and call it orthogonal to
    # [0, 1, 0], which points the same way (a falsifying example hypothesis found).
    xd = x.double()
    norms = torch.linalg.vector_norm(xd, dim=-1, keepdim=True)
    xn = torch.where(norms > 0, xd / torch.where(norms > 0, norms, 1.0), 0.0)
    c = xn @ xn.T
    c.fill_diagonal_(-1.0)
    return float(1 - c.max()) if len(x) > 1 else 2.0


@SETTINGS
@given(image(max_d=6))
def test_huge_gamma_is_topk_by_importance(img):
    x, s, k = img
    # Distinct directions (d >= 0.01): gamma = 1e9 makes every w underflow to exactly 0.
    assume(pairwise_min_distance(x) >= 0.01)
    k = min(k, len(s))
    expected = sorted(sorted(range(len(s)), key=lambda i: (-float(s[i]), i))[:k])
    assert id_select(x, s, k, gamma=1e9).tolist() == expected


def test_a_tiny_row_points_where_it_points():
    """The example that once slipped through the assumption above: [0, 5e-26, 0] and [0, 1, 0]
    are the same direction, so the second is suppressed by the first at any gamma."""
    x = torch.zeros(13, 3)
    x[8, 1], x[9, 1] = 5.041908333297273e-26, 1.0
    s = torch.zeros(13)
    s[[8, 9, 12]] = 1.0
    assert pairwise_min_distance(x) == 0.0
    assert id_select(x, s, 2, gamma=1e9).tolist() == [8, 12]


def pick_order(x: torch.Tensor, s: torch.Tensor, k: int, mode="subtract") -> list[int]:
    """The greedy order, recovered from budgets 1..k (each budget's picks extend the last's)."""
    order: list[int] = []
    for budget in range(1, k + 1):
        picks = set(id_select(x, s, budget, suppression=mode).tolist())
        assert set(order) < picks, "picks for budget k must extend those for k - 1"
        (new,) = picks - set(order)
        order.append(new)
    return order


@SETTINGS
@given(st.data())
def test_duplicates_wait_until_every_other_score_is_zero(data):
    groups = data.draw(st.integers(1, 5))
    d = data.draw(st.integers(1, 4))
    coord = st.floats(-10, 10, width=32).filter(lambda v: abs(v) > 1e-3)
    base = torch.tensor(data.draw(st.lists(coord, min_size=groups * d, max_size=groups * d)))
    base = base.float().reshape(groups, d)
    n = data.draw(st.integers(2, 10))
    member = data.draw(st.lists(st.integers(0, groups - 1), min_size=n, max_size=n))
    x = base[torch.tensor(member)]
    s = torch.tensor(data.draw(st.lists(st.floats(0, 1, width=32), min_size=n, max_size=n)))
    k = data.draw(st.integers(1, n - 1))
    order = pick_order(x, s, k)

    # Replay the spec in fp64 along that order; whenever a token duplicates an earlier pick,
    # every remaining token that duplicates no earlier pick must be (numerically) at zero.
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    orig = s.double()
    span = float(orig.max() - orig.min())
    cur = (orig - orig.min()) / span if span > 0 else torch.ones_like(orig)
    for t, p in enumerate(order):
        alive = [j for j in range(n) if j not in order[:t]]
        assert float(cur[p]) >= max(float(cur[j]) for j in alive) - 1e-6  # greedy argmax
        seen = {member[q] for q in order[:t]}
        if member[p] in seen:
            fresh = [j for j in alive if member[j] not in seen]
            assert all(float(cur[j]) <= 1e-6 for j in fresh), (t, p, cur.tolist())
        w = torch.exp(-20.0 * (1 - xn @ xn[p]) ** 2)
        cur = torch.clamp(cur - w * cur[p], min=0)


@SETTINGS
@given(image(), st.sampled_from(["subtract", "multiply"]))
def test_deterministic(img, mode):
    x, s, k = img
    first = id_select(x, s, k, suppression=mode).tolist()
    assert id_select(x.clone(), s.clone(), k, suppression=mode).tolist() == first
    assert id_select(x, s, k, suppression=mode).tolist() == first


@SETTINGS
@given(image(), st.sampled_from([torch.float16, torch.bfloat16]), st.sampled_from([0, 1]))
def test_half_precision_inputs_match_their_fp32_upcast(img, dtype, mode_i):
    x, s, k = img
    mode = ("subtract", "multiply")[mode_i]
    xh, sh = x.clamp(-6e4, 6e4).to(dtype), s.clamp(0, 6e4).to(dtype)
    assert (
        id_select(xh, sh, k, suppression=mode).tolist()
        == id_select(xh.float(), sh.float(), k, suppression=mode).tolist()
    )


@SETTINGS
@given(image(), st.lists(st.sampled_from([2.0**-100, 1.0, 2.0**100]), min_size=14, max_size=14))
def test_rows_can_be_rescaled_by_huge_or_tiny_factors(img, factors):
    # Cosine only sees directions; exact power-of-two rescaling must not change anything, even
    # where a naive norm would overflow (2^100 squared) or underflow (2^-100 squared).
    x, s, k = img
    x = torch.where(x.abs() < 1e-3, 0.0, x)  # keep every scaled entry a normal float
    scaled = x * torch.tensor(factors[: len(x)]).unsqueeze(1)
    assert id_select(scaled, s, k).tolist() == id_select(x, s, k).tolist()


def test_integer_scores_are_accepted():
    # int64 [3, 1, 2] -> [1, 0, .5]: t0, then its duplicate t1 is at 0 and t2 (.5) follows.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert id_select(x, torch.tensor([3, 1, 2]), 2).tolist() == [0, 2]


# --- input validation -------------------------------------------------------------------------

X, S = torch.randn(5, 3), torch.rand(5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be an int >= 1"),
        ({"k": -3}, "k must be an int >= 1"),
        ({"k": True}, "k must be an int"),
        ({"k": 2.0}, "k must be an int"),
        ({"k": "2"}, "k must be an int"),
        ({"k": None}, "k must be an int"),
        ({"features": X[0]}, "features must be 2-D"),
        ({"features": X[None]}, "features must be 2-D"),
        ({"features": X.tolist()}, "features must be a torch.Tensor"),
        ({"features": torch.empty(5, 0)}, "features must have at least one feature dimension"),
        ({"features": X.bool()}, "features must be real-valued"),
        ({"scores": S[None]}, "scores must be 1-D"),
        ({"scores": S[:4]}, "features has 5 tokens but scores has 4"),
        (
            {"features": X.clone().index_fill_(0, torch.tensor([2]), math.nan)},
            "features must be fin",
        ),
        (
            {"features": X.clone().index_fill_(0, torch.tensor([1]), math.inf)},
            "features must be fin",
        ),
        ({"scores": S.clone().index_fill_(0, torch.tensor([3]), math.nan)}, "scores must be fin"),
        ({"scores": S.clone().index_fill_(0, torch.tensor([3]), -math.inf)}, "scores must be fin"),
        ({"scores": S - 2.0}, "scores must be non-negative"),
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"gamma": -1.0}, "gamma must be > 0"),
        ({"gamma": math.inf}, "gamma must be a finite number"),
        ({"gamma": math.nan}, "gamma must be a finite number"),
        ({"gamma": True}, "gamma must be a finite number"),
        ({"gamma": "20"}, "gamma must be a finite number"),
        ({"suppression": "add"}, "suppression must be one of"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(kwargs, match):
    args = {"features": X, "scores": S, "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        id_select(**args)


def test_bad_input_is_refused_even_when_k_covers_everything():
    with pytest.raises(ValueError, match="scores must be non-negative"):
        id_select(X, S - 2.0, 100)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([X, X], [S], [1, 1]), "one entry per image"),
        (([X], [S], [1, 2]), "one entry per image"),
        ((X, S[None], [1]), "features must be a 3-D tensor"),
        ((X[None], S, [1]), "scores must be a 2-D tensor"),
        (([X], [S], 3), "ks must be a sequence"),
        (([X, X], [S, S - 2], [1, 1]), r"scores\[1\] must be non-negative"),
        (([X, X], [S, S], [1, 0]), r"k\[1\] must be an int >= 1"),
        (([X, X[:, :2]], [S, S[:4]], [1, 1]), r"features\[1\] has 5 tokens but scores\[1\] has 4"),
    ],
)
def test_batched_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        id_select_batched(*args)


def test_batched_empty_and_keep_all_mix():
    assert id_select_batched([], [], []) == []
    out = id_select_batched([X, X], [S, S], [10, 2])
    assert out[0].tolist() == [0, 1, 2, 3, 4]
    assert out[1].tolist() == id_select(X, S, 2).tolist()
