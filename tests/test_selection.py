import itertools

import pytest
import torch

from toma_export import facility_location
from toma_export.toma.selection import TIE_TOL


def brute_force_greedy(x: torch.Tensor, k: int) -> list[int]:
    """Greedy on f(S) = sum_u max_{s in S} cos(u, s), evaluated from scratch in float64 for every candidate."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    sim = xn @ xn.T
    chosen: list[int] = []
    for _ in range(k):
        vals = {v: sim[chosen + [v]].max(0).values.sum().item() for v in range(x.shape[0]) if v not in chosen}
        top = max(vals.values())
        chosen.append(min(v for v, val in vals.items() if val >= top - TIE_TOL))   # ties: lowest index
    return chosen


@pytest.mark.parametrize("n,c,k", [(5, 3, 3), (8, 4, 8), (12, 6, 5), (16, 8, 8)])
def test_matches_brute_force_on_random_problems(n, c, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(20, n, c, generator=g)
    got = facility_location(x, k)
    assert got.shape == (20, k) and got.dtype == torch.int64
    for b in range(x.shape[0]):
        assert got[b].tolist() == brute_force_greedy(x[b], k)


def test_symmetric_exact_tie_goes_to_lower_index():
    # after the first pick (token 3), tokens 1 and 2 only cover each other: f({3,1}) == f({3,2}) exactly
    x = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.2], [0.0, 0.9, 0.3], [1.0, 0.1, 0.0]]])
    assert facility_location(x, 2)[0].tolist() == brute_force_greedy(x[0], 2)
    perm = torch.tensor([0, 2, 1, 3])                          # swap the tied pair: the lower index still wins
    assert facility_location(x[:, perm], 2)[0, 1].item() == facility_location(x, 2)[0, 1].item()


def test_duplicates_and_ties_pick_distinct_lowest_indices():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = base[[0, 0, 1, 1, 2, 2, 0, 1]].unsqueeze(0)            # every token twice or more
    got = facility_location(x, 8)[0].tolist()
    assert sorted(got) == list(range(8))                       # k = n: every token exactly once
    assert got == brute_force_greedy(x[0], 8)
    # the three distinct directions come first, each at its lowest index
    assert got[:3] == brute_force_greedy(x[0], 3)
    assert set(got[:3]) == {4, 0, 2}


def test_identical_tokens_yield_distinct_indices_in_order():
    x = torch.ones(3, 6, 4)
    assert facility_location(x, 4).tolist() == [[0, 1, 2, 3]] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_is_computed_in_fp32(dtype):
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    want = facility_location(x.to(dtype).float(), 6)
    assert torch.equal(facility_location(x.to(dtype), 6), want)


def test_picks_are_always_distinct():
    x = torch.randn(50, 16, 3, generator=torch.Generator().manual_seed(2))
    got = facility_location(x, 16)
    for row in got.tolist():
        assert sorted(row) == list(range(16))


def test_objective_beats_any_other_first_pick():
    x = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(3))
    xn = torch.nn.functional.normalize(x[0], dim=-1)
    f = lambda s: (xn[list(s)] @ xn.T).max(0).values.sum().item()  # noqa: E731
    first = facility_location(x, 1)[0].tolist()
    assert f(first) >= max(f((v,)) for v in range(9)) - 1e-6
    greedy2 = facility_location(x, 2)[0].tolist()
    best2 = max(f(s) for s in itertools.combinations(range(9), 2))
    assert f(greedy2) >= (1 - 1 / 2.718281828) * best2


@pytest.mark.parametrize("k", [0, -1, 17])
def test_bad_k_is_a_clear_error(k):
    with pytest.raises(ValueError, match="between 1 and the 16 tokens"):
        facility_location(torch.randn(2, 16, 4), k)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(B, n, C\)"):
        facility_location(torch.randn(16, 4), 2)
    with pytest.raises(TypeError, match="floating-point"):
        facility_location(torch.ones(1, 4, 2, dtype=torch.int64), 2)
