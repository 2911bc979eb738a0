"""Two time-scale update rule (Sec. 4.2, 4.6): update counts, network calls, what each update may touch."""

import math

import pytest
import torch

import dmd2
from helpers import Counter, TinyCritic, TinyGenerator, same, snapshot


class CountingAdamW(torch.optim.AdamW):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _setup(gan=True, n_classes=10, seed=0):
    torch.manual_seed(seed)
    teacher = TinyCritic(n_classes=n_classes)
    for p in teacher.parameters():
        p.requires_grad_(False)
    G, fake = TinyGenerator(), TinyCritic(n_classes=n_classes)
    fake.load_state_dict(teacher.state_dict())
    head = dmd2.GANHead(8, 4) if gan else None
    g_opt = CountingAdamW(G.parameters(), lr=1e-3)
    c_opt = CountingAdamW([*fake.parameters(), *(head.parameters() if gan else [])], lr=1e-3)
    return teacher, G, fake, head, g_opt, c_opt


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return dict(x_in=80 * torch.randn(n, 3, 8, 8, generator=g), t_in=torch.full((n,), 999),
                cond=torch.randint(0, 10, (n,), generator=g), x_real=torch.randn(n, 3, 8, 8, generator=g),
                cond_real=torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("ratio,n_iters", [(1, 7), (5, 11), (5, 10), (3, 1), (10, 25)])
def test_update_counts_and_what_changes(ratio, n_iters):
    teacher, G, fake, head, g_opt, c_opt = _setup()
    hp = dmd2.TTUR(ratio=ratio)
    sch, t0 = dmd2.EDMSchedule(), snapshot(teacher)
    for it in range(n_iters):
        g_before, c_before = snapshot(G), snapshot(fake)
        logs = dmd2.train_iteration(it, G, teacher, fake, head, g_opt, c_opt, sch, **_batch(it), hp=hp)
        assert ("loss_dmd" in logs) == (it % ratio == 0) and "loss_fake" in logs and "loss_gan_d" in logs
        assert same(snapshot(G), g_before) != (it % ratio == 0), "G changes exactly on generator iterations"
        assert not same(snapshot(fake), c_before), "the critic changes every iteration"
    assert c_opt.steps == n_iters and g_opt.steps == math.ceil(n_iters / ratio)
    assert same(snapshot(teacher), t0) and all(p.grad is None for p in teacher.parameters())


def _counted(gan=True, it=0, ratio=5):
    teacher, G, fake, head, g_opt, c_opt = _setup(gan=gan)
    Gc, tc, fc = Counter(G), Counter(teacher), Counter(fake)
    b = _batch(0)
    dmd2.train_iteration(it, Gc, tc, fc, head, g_opt, c_opt, dmd2.EDMSchedule(), **b,
                         hp=dmd2.TTUR(ratio=ratio, gan_g=3e-3 if gan else 0, gan_d=1e-2 if gan else 0))
    return Gc, tc, fc, b


def test_network_calls_of_a_generator_iteration():
    Gc, tc, fc, b = _counted(it=0)
    assert [c["grad"] for c in Gc.calls] == [True], "G: one forward, with grad"
    assert [c["grad"] for c in tc.calls] == [False], "teacher: one no-grad forward (DMD)"
    assert [c["grad"] for c in fc.calls] == [False, True], "fake: DMD (no grad) + denoising loss"
    assert [len(c["x_t"]) for c in fc.feature_calls] == [4, 8], "encoder: GAN-G, then fake+real in one batch"
    assert fc.feature_calls[0]["grad"] and fc.feature_calls[1]["grad"]
    # the critic update reuses this iteration's generator output (from before G's update), noised
    x, sch = Gc.calls[0]["out"], dmd2.EDMSchedule()
    t = fc.calls[1]["t"]
    eps = (fc.calls[1]["x_t"] - x) / sch.sigma(t, x)
    assert abs(eps.std().item() - 1) < 0.2 and abs(eps.mean().item()) < 0.2, "x_t = x + sigma eps"
    # the discriminator batch is [fake; real], each noised with its own timestep
    d = fc.feature_calls[1]
    for part, clean in [(slice(0, 4), x), (slice(4, 8), b["x_real"])]:
        e = (d["x_t"][part] - clean) / sch.sigma(d["t"][part], clean)
        assert abs(e.std().item() - 1) < 0.2 and abs(e.mean().item()) < 0.2
    assert torch.equal(d["cond"], torch.cat([b["cond"], b["cond_real"]]))


def test_network_calls_of_a_critic_only_iteration():
    Gc, tc, fc, _ = _counted(it=3)
    assert [c["grad"] for c in Gc.calls] == [False], "G: one no-grad forward to make samples"
    assert tc.calls == [], "no teacher call on critic-only iterations"
    assert [c["grad"] for c in fc.calls] == [True] and [len(c["x_t"]) for c in fc.feature_calls] == [8]


def test_no_gan_no_encoder_calls():
    Gc, tc, fc, _ = _counted(gan=False, it=0)
    assert len(Gc.calls) == 1 and len(tc.calls) == 1 and len(fc.calls) == 2 and fc.feature_calls == []


def test_generator_step_touches_only_G():
    teacher, G, fake, head, g_opt, c_opt = _setup()
    for p in [*fake.parameters(), *head.parameters()]:
        p.grad = torch.full_like(p, 0.125)
    before = snapshot(fake), snapshot(head), snapshot(G), snapshot(teacher)
    b = _batch(1)
    x, logs = dmd2.generator_step(G, g_opt, b["x_in"], b["t_in"], teacher, fake, head, dmd2.EDMSchedule(),
                                  b["cond"], dmd2.TTUR(gan_g=0.5))
    assert logs["loss_gan_g"] > 0 and logs["loss_dmd"] >= 0 and not x.requires_grad
    assert same(snapshot(fake), before[0]) and same(snapshot(head), before[1]) and same(snapshot(teacher), before[3])
    assert not same(snapshot(G), before[2])
    assert all(torch.equal(p.grad, torch.full_like(p, 0.125)) for p in [*fake.parameters(), *head.parameters()])
    assert all(p.requires_grad for p in [*fake.parameters(), *head.parameters()])


def test_critic_step_touches_only_critic_and_head():
    teacher, G, fake, head, g_opt, c_opt = _setup()
    before = snapshot(G), snapshot(fake), snapshot(head)
    x = G(torch.randn(4, 3, 8, 8), None)  # attached to G's graph on purpose
    b = _batch(2)
    logs = dmd2.critic_step(fake, head, c_opt, x, dmd2.EDMSchedule(), b["cond"], b["x_real"], b["cond_real"])
    assert set(logs) >= {"loss_fake", "loss_gan_d", "d_real", "d_fake", "grad_norm_c"}
    assert same(snapshot(G), before[0]) and all(p.grad is None for p in G.parameters())
    assert not same(snapshot(fake), before[1]) and not same(snapshot(head), before[2])


def test_gradient_clipping():
    teacher, G, fake, head, g_opt, c_opt = _setup(gan=False)
    b = _batch(3)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.1 * torch.randn_like(p))  # fake != real, so the DMD gradient is not zero
    _, logs = dmd2.generator_step(G, g_opt, b["x_in"], b["t_in"], teacher, fake, None, dmd2.EDMSchedule(),
                                  b["cond"], dmd2.TTUR(gan_g=0, max_grad_norm=1e-3))
    total = torch.sqrt(sum((p.grad**2).sum() for p in G.parameters()))
    assert logs["grad_norm_g"] > 1e-3 and total.item() == pytest.approx(1e-3, rel=1e-3)


def test_critic_clip_counts_each_parameter_once():
    """The critic module holds the GAN head (as edm.Critic does) and the head is also passed beside it: each
    parameter enters the clipped norm once, so after clipping the gradients' norm is exactly the clip."""
    teacher, G, fake, head, g_opt, c_opt = _setup()

    class CriticWithHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fake, self.head = fake, head

        def forward(self, x_t, t, cond):
            return self.fake(x_t, t, cond)

        def features(self, x_t, t, cond):
            return self.fake.features(x_t, t, cond)

    critic, b = CriticWithHead(), _batch(5)
    logs = dmd2.critic_step(critic, head, c_opt, torch.randn(4, 3, 8, 8), dmd2.EDMSchedule(), b["cond"], b["x_real"],
                            b["cond_real"], dmd2.TTUR(gan_d=1e3, max_grad_norm=1e-3))  # the head's gradients weigh
    total = torch.sqrt(sum((p.grad**2).sum() for p in critic.parameters()))  # each parameter once
    assert logs["grad_norm_c"] > 1e-2 and total.item() == pytest.approx(1e-3, rel=1e-4)
    assert all(p.grad.abs().sum() > 0 for p in head.parameters())


def test_gan_alone():
    teacher, G, fake, head, g_opt, c_opt = _setup()
    Gc, tc, fc = Counter(G), Counter(teacher), Counter(fake)
    b = _batch(4)
    _, logs = dmd2.generator_step(Gc, g_opt, b["x_in"], b["t_in"], tc, fc, head, dmd2.EDMSchedule(), b["cond"],
                                  dmd2.TTUR(dmd_weight=0.0))
    assert "loss_dmd" not in logs and tc.calls == [] and fc.calls == [] and len(fc.feature_calls) == 1


@pytest.mark.parametrize("kw", [dict(ratio=0), dict(gan_g=-1.0), dict(dmd_weight=0.0, gan_g=0.0),
                                dict(t_min=0.5, t_max=0.4), dict(gan_t_max=1.5)])
def test_ttur_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        dmd2.TTUR(**kw)


class CheckpointedCritic(TinyCritic):
    """The encoder under activation checkpointing: its recomputation runs inside the backward. A learned gain
    makes what autograd saves depend on requires_grad, so frozen and unfrozen passes differ."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gain = torch.nn.Parameter(torch.ones(8, 1, 1))

    def _encode(self, x_t, t, cond):
        return super().features(x_t, t, cond) * self.gain

    def features(self, x_t, t, cond=None):
        return torch.utils.checkpoint.checkpoint(self._encode, x_t, t, cond, use_reentrant=False)


def test_generator_step_with_a_checkpointed_critic():
    torch.manual_seed(0)
    teacher, G, _, head, g_opt, _ = _setup()
    fake = CheckpointedCritic(n_classes=10)
    fake.load_state_dict(teacher.state_dict(), strict=False)
    before = snapshot(fake), snapshot(head)
    b = _batch(5)
    _, logs = dmd2.generator_step(G, g_opt, b["x_in"], b["t_in"], teacher, fake, head, dmd2.EDMSchedule(),
                                  b["cond"], dmd2.TTUR(gan_g=1.0))
    assert logs["loss_gan_g"] > 0 and all(p.grad is not None for p in G.parameters())
    assert all(p.grad is None for p in [*fake.parameters(), *head.parameters()])
    assert same(snapshot(fake), before[0]) and same(snapshot(head), before[1])
