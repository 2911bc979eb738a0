"""Multi-step generator (Sec. 4.4): step list and sampler; backward simulation (Sec. 4.5)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2
from helpers import Counter

VP, EDM = dmd2.VPSchedule(), dmd2.EDMSchedule()


def test_step_lists():
    assert dmd2.step_timesteps(4) == [999, 749, 499, 249]
    assert dmd2.step_timesteps(1) == [999]
    assert dmd2.step_timesteps(2) == [999, 499]


@given(n=st.integers(1, 500))
def test_step_list_properties(n):
    ts = dmd2.step_timesteps(n)
    assert len(ts) == n and ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:], strict=False)) and ts[-1] >= 1


@pytest.mark.parametrize("n", [0, -1, 501])
def test_step_list_rejects(n):
    with pytest.raises(ValueError):
        dmd2.step_timesteps(n)


def _const_G(value=0.25):
    # returns a constant image: any structure in the next input is the injected noise
    return Counter(lambda x_t, t, c: torch.full_like(x_t, value))


def test_sampler_denoise_renoise_with_fresh_noise():
    G, ts = _const_G(), [999, 749, 499, 249]
    z = torch.randn(3, 2, 4, 4)
    x = dmd2.sample(G, z, VP, ts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.full_like(z, 0.25)), "output is the last x0"
    assert [c["t"].tolist() for c in G.calls] == [[t] * 3 for t in ts]
    assert torch.equal(G.calls[0]["x_t"], z), "VP: pure noise z at t=999, not F(x, 999)"
    eps = []
    for c in G.calls[1:]:
        t = c["t"]
        eps.append((c["x_t"] - VP.alpha(t, z) * 0.25) / VP.sigma(t, z))  # x_{t_i} = alpha x0 + sigma eps
    for i, e in enumerate(eps):
        assert abs(e.std().item() - 1) < 0.3
        assert not torch.allclose(e, z) and all(not torch.allclose(e, f) for f in eps[i + 1:]), "fresh noise"
    assert not any(c["grad"] for c in G.calls)


def test_edm_prior_is_sigma_max_noise():
    G = _const_G()
    z = torch.randn(2, 3)
    dmd2.sample(G, z, EDM, [999])
    torch.testing.assert_close(G.calls[0]["x_t"], 80 * z)


def test_one_step_with_conditioning_timestep():
    # SDXL's one-step model: pure noise in, conditioning timestep 399
    G = _const_G()
    z = torch.randn(2, 4, 8, 8)
    dmd2.sample(G, z, VP, [399])
    assert torch.equal(G.calls[0]["x_t"], z) and G.calls[0]["t"].tolist() == [399, 399]


def test_backward_simulation_k0_is_pure_noise_without_calls():
    G = _const_G()
    z = torch.randn(4, 3)
    x_t, t = dmd2.backward_simulation(G, z, EDM, [999, 749, 499, 249], k=0)
    assert torch.equal(x_t, 80 * z) and t.tolist() == [999] * 4 and G.calls == []


@pytest.mark.parametrize("k", [1, 2, 3])
def test_backward_simulation_runs_k_no_grad_steps_and_renoises_to_t_k(k):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    G = Counter(lambda x_t, t, c: net(x_t))
    ts = [999, 749, 499, 249]
    z = torch.randn(5, 3)
    x_t, t = dmd2.backward_simulation(G, z, VP, ts, k=k, generator=torch.Generator().manual_seed(1))
    assert len(G.calls) == k and [c["t"][0].item() for c in G.calls] == ts[:k]
    assert t.tolist() == [ts[k]] * 5, "one k, one t_k for the whole batch"
    assert not x_t.requires_grad and not any(c["grad"] for c in G.calls)
    # the input the sampler gives G at step k is the same (same seed)
    G2 = Counter(lambda x_t, t, c: net(x_t))
    dmd2.sample(G2, z, VP, ts, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(G2.calls[k]["x_t"], x_t)


def test_backward_simulation_draws_one_k_in_range():
    ks = set()
    for seed in range(60):
        G = _const_G()
        _, t = dmd2.backward_simulation(G, torch.randn(8, 2), VP, [999, 749, 499, 249],
                                        generator=torch.Generator().manual_seed(seed))
        assert len(t.unique()) == 1
        ks.add(len(G.calls))
    assert ks == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        dmd2.backward_simulation(G, torch.randn(8, 2), VP, [999, 499], k=2)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), steps=st.integers(1, 5))
def test_sampler_same_seed_same_result(seed, n, steps):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    def G(x_t, t, c):
        return net(x_t)
    z = torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    ts = dmd2.step_timesteps(steps)
    a = dmd2.sample(G, z, VP, ts, generator=torch.Generator().manual_seed(seed))
    b = dmd2.sample(G, z, VP, ts, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b) and a.shape == z.shape
    if steps > 1:
        c = dmd2.sample(G, z, VP, ts, generator=torch.Generator().manual_seed(seed + 1))
        assert not torch.equal(a, c)
