"""The sampling baselines on real wild data, through their real code paths: DFND's selection (exactly the
top k, sharded == unsharded), its noise-adaptation layer in the loop, MosaicKD's discriminator and
generator losses, and the wild pools (in memory, streamed, any image folder)."""

import faiss  # noqa: F401  (before torch)
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdci_ray.config import DistillConfig, WildDataConfig, load_config
from kdci_ray.data import DatasetError, load_dataset, load_pool
from kdci_ray.engine.distill import distill, make_source
from kdci_ray.models import create_model
from kdci_ray.synthesis import WildImages, create_synthesizer, merge_selections, select_top_k, self_confidence, top_k
from kdci_ray.synthesis.dfnd import NoiseAdaptation
from kdci_ray.synthesis.losses import noise_adapted_nll

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def wild():
    return WildImages(WildDataConfig(dataset="digits-wild"), SHAPE)


def brute_force_top_k(scores, k):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


# -- DFND selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 100, 500])
def test_top_k_is_exactly_the_k_best_with_ties_broken_by_row(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    selection = top_k(scores, torch.arange(300), k)
    assert selection.indices.tolist() == brute_force_top_k(scores.tolist(), k)
    assert torch.equal(selection.scores, scores[selection.indices])


@pytest.mark.parametrize("cuts", [[0, 300], [0, 1, 299, 300], [0, 50, 50, 177, 300], [0, 100, 200, 300]])
@pytest.mark.parametrize("k", [5, 64, 300, 1000])
def test_merging_shard_selections_equals_selecting_everything_at_once(k, cuts):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 30, (300,), generator=g).float()
    rows = torch.randperm(300, generator=g)  # rows arrive in any order
    shards = [top_k(scores[lo:hi], rows[lo:hi], k) for lo, hi in zip(cuts, cuts[1:])]
    merged = merge_selections(shards, k)
    whole = top_k(scores, rows, k)
    assert torch.equal(merged.indices, whole.indices) and torch.equal(merged.scores, whole.scores)
    assert len(merged) == min(k, 300)


def test_self_confidence_is_minus_the_teachers_loss_on_its_own_prediction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 3
    expected = -F.cross_entropy(logits, logits.argmax(1), reduction="none")
    assert torch.allclose(self_confidence(logits), expected, atol=1e-5)
    # Same order as the teacher's top probability ...
    assert torch.equal(torch.argsort(self_confidence(logits)), torch.argsort(F.softmax(logits, 1).max(1).values))
    # ... but still distinct where fp32 rounds that probability to exactly 1.
    sure = torch.zeros(2, 10)
    sure[0, 0], sure[1, 0] = 30.0, 40.0
    assert F.softmax(sure, 1).max(1).values.tolist() == [1.0, 1.0]
    assert self_confidence(sure)[1] > self_confidence(sure)[0]


def test_teacher_selection_is_exact_and_shardable(teacher, normalize, wild):
    k = 500
    scores = torch.cat([self_confidence(teacher(normalize(images))) for _, images in wild.batches(64)])
    expected = brute_force_top_k(scores.tolist(), k)
    # Streaming with a small buffer exercises the periodic reduction to the k best.
    whole = select_top_k(teacher, wild.batches(64), normalize, k, buffer=600)
    assert whole.indices.tolist() == expected
    # Shard by shard (row ranges, as the Ray layer splits the pool; cuts inside scoring batches and another
    # batch size per shard), then merged.
    cuts, sizes = [0, 1000, 2560, len(wild)], [100, 37, 256]
    shards = [select_top_k(teacher, wild.batches(b, lo, hi), normalize, k) for lo, hi, b in zip(cuts, cuts[1:], sizes)]
    merged = merge_selections(shards, k)
    assert torch.equal(merged.indices, whole.indices) and torch.equal(merged.scores, whole.scores)
    with pytest.raises(ValueError, match="overlap"):
        merge_selections([shards[0], shards[0]], k)


def test_a_non_finite_teacher_output_ranks_last():
    logits = torch.tensor([[5.0, 0.0], [float("nan"), 0.0], [1.0, 0.0]])
    assert top_k(self_confidence(logits), torch.arange(3), 3).indices.tolist() == [0, 2, 1]


def test_selection_refuses_a_teacher_in_train_mode(teacher, normalize, wild):
    with pytest.raises(ValueError, match="eval mode"):
        select_top_k(copy.deepcopy(teacher).train(), wild.batches(64), normalize, 10)


# -- DFND noise adaptation --------------------------------------------------------------------------
def test_noise_adaptation_learns_the_teachers_label_noise():
    torch.manual_seed(0)
    layer = NoiseAdaptation(10, diagonal=0.8)
    q0 = layer.matrix().detach()
    assert torch.allclose(q0.sum(1), torch.ones(10)) and torch.allclose(q0.diagonal(), torch.full((10,), 0.8))
    assert torch.allclose(q0[0, 1:], torch.full((9,), 0.2 / 9))  # uniform off-diagonal at the start
    # A student that is right, and pseudo-labels that turn 3 into 5 a third of the time.
    truth = torch.arange(10).repeat(60)
    student_logits = F.one_hot(truth, 10).float() * 8
    noisy = truth.clone()
    flip = (truth == 3) & (torch.rand(len(truth)) < 1 / 3)
    noisy[flip] = 5
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        loss = noise_adapted_nll(student_logits, layer.matrix(), noisy)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    q = layer.matrix().detach()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not torch.allclose(q, q0) and not torch.allclose(q, torch.eye(10))
    assert q[3].argsort(descending=True)[1].item() == 5  # after the fixed diagonal, 3's mass went to 5
    assert torch.allclose(q.sum(1), torch.ones(10)) and torch.allclose(q.diagonal(), torch.full((10,), 0.8))


def dfnd_config(teacher_path, out, *overrides):
    path = REPO / "configs" / "dfnd-digits-digits_cnn-digits_cnn_small.yaml"
    return load_config(path, DistillConfig, [f"teacher.weights={teacher_path}", f"output.dir={out}", *overrides])


def test_dfnd_in_the_loop_selects_once_trains_the_transition_matrix_and_builds_the_dictionary_once(
    digits_teacher, tmp_path, monkeypatch
):
    import kdci_ray.engine.distill as loop

    builds = []
    real = loop.build_dictionary
    monkeypatch.setattr(loop, "build_dictionary", lambda blocks, n, **kw: builds.append(sum(len(b[1]) for b in blocks)) or real(blocks, n, **kw))
    cfg = dfnd_config(digits_teacher, tmp_path, "optim.epochs=3", "synthesis.num_select=600", "kdci.n=16")
    source = make_source(cfg)
    result = distill(cfg, source)
    assert builds == [540]  # once, from the selected set less the 10 % held out for validation
    history = result.history
    assert all(np.isfinite(row["train_noise_adaptation"]) and row["train_noise_adaptation"] > 0 for row in history)
    assert history[0]["dfnd_selected"] == 600
    q = source.transition_matrix()
    start = NoiseAdaptation(10, cfg.synthesis.transition_diagonal).matrix().detach()
    # Its off-diagonal logits were trained (Adam steps) and moved the matrix away from its start and from I.
    assert source.adaptation.logits.abs().max() > 0.01  # 27 Adam steps of lr 1e-3
    off = ~torch.eye(10, dtype=torch.bool)
    assert ((q - start)[off].abs() / start[off]).max() > 0.01 and not torch.allclose(q, torch.eye(10))
    assert history[-1]["dfnd_transition_offdiag_max"] > start[off].max()
    # The pool is exactly the teacher's 600 most confident wild images.
    teacher = source.teacher
    expected = select_top_k(teacher, source.wild.batches(1024), source.teacher_input, 600)
    assert torch.equal(source.selection.indices, expected.indices)
    train, held = source._split()  # a seeded 10 % of the selection is held out: never in a batch or the dictionary
    assert len(held) == 60 and set(train.tolist()) | set(held.tolist()) == set(expected.indices.tolist())
    assert torch.equal(source.pool.filled()[0], source.wild.gather(train))
    assert torch.equal(source.validation_images(), source.wild.gather(held))


def test_dfnd_noise_adaptation_off_is_plain_kd(digits_teacher, tmp_path):
    cfg = dfnd_config(digits_teacher, tmp_path, "optim.epochs=1", "synthesis.num_select=300", "synthesis.noise_adaptation=0", "kdci.enabled=false")
    result = distill(cfg, make_source(cfg))
    assert "train_noise_adaptation" not in result.history[0] and "train_kd" in result.history[0]


def test_dfnd_checkpoint_carries_rows_not_pixels(teacher, normalize):
    def make():
        synth = create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild"}, "num_select": 200}, SHAPE, 10, seed=0)
        synth.bind(teacher, create_model("digits_cnn_small", num_classes=10, in_channels=1), normalize)
        return synth

    a = make()
    a.begin_epoch(1, None)
    state = copy.deepcopy(a.state_dict())
    assert state["pool"] is None and state["extra"]["selection"]["indices"].shape == (200,)
    b = make()
    b.load_state_dict(state)
    for mine, theirs in zip(a.pool.filled()[:2], b.pool.filled()[:2]):
        assert torch.equal(mine, theirs)
    assert torch.equal(next(iter(a.batches(2, 32))), next(iter(b.batches(2, 32))))


def test_dfnd_refuses_generation_settings_and_keeps_all_of_a_small_pool(teacher, normalize):
    with pytest.raises(ValueError, match="g_steps.*dfnd synthesizes nothing"):
        create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild"}, "g_steps": 3}, SHAPE, 10)
    with pytest.raises(ValueError, match="transition_diagonal = 0.1 is at most 1/10"):
        create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild"}, "transition_diagonal": 0.1}, SHAPE, 10)
    with pytest.raises(ValueError, match="no such dataset 'tiny_imagenet'"):
        create_synthesizer({"method": "dfnd", "wild": {"dataset": "tiny_imagenet"}}, SHAPE, 10)
    synth = create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild", "limit": 100}}, SHAPE, 10)
    synth.bind(teacher, create_model("digits_cnn_small", num_classes=10, in_channels=1), normalize)
    synth.begin_epoch(1, None)
    assert len(synth.pool) == 100 and synth.min_dictionary_images() == 100  # num_select 600k > pool: all kept


# -- MosaicKD ---------------------------------------------------------------------------------------
def mosaickd(teacher, normalize, **overrides):
    cfg = {"method": "mosaickd", "wild": {"dataset": "digits-wild"}, "batch_size": 64, "nz": 16, "ngf": 16, "ndf": 32,
           "lr_schedule": "constant", **overrides}
    synth = create_synthesizer(cfg, SHAPE, 10, seed=0)
    torch.manual_seed(0)
    synth.bind(teacher, create_model("digits_cnn_small", num_classes=10, in_channels=1), normalize)
    return synth


def terms_over(synth, name):
    return torch.stack([step[name] for step in synth.term_trace])


def test_mosaickd_discriminator_learns_to_tell_generated_from_ood_patches(teacher, normalize):
    # The generator barely moves (lr_g tiny): the discriminator's loss must fall as it separates them.
    synth = mosaickd(teacher, normalize, g_steps=40, lr_g=1e-9)
    synth.step()
    disc = terms_over(synth, "disc")
    chance = 4 * np.log(2)  # 2 x 2 patch logits on 8 px images, summed: the loss of a guessing D
    assert torch.isfinite(disc).all() and disc[-5:].mean() < 0.9 * disc[:5].mean() and disc[-5:].mean() < 0.85 * chance, disc


def test_mosaickd_generator_learns_to_fool_the_discriminator_and_the_teacher_terms_fall(teacher, normalize):
    # A fixed discriminator (lr_d tiny): the generator's local (fool D), align (teacher entropy) and
    # balance (negative marginal entropy) terms all fall; the adversarial term is negative (divergence sought).
    synth = mosaickd(teacher, normalize, g_steps=40, lr_d=1e-9)
    synth.step()
    for name in ("local", "align", "balance"):
        term = terms_over(synth, name)
        assert torch.isfinite(term).all() and term[-5:].mean() < term[:5].mean(), (name, term)
    assert (terms_over(synth, "adv") < 0).all()
    assert terms_over(synth, "balance").min() >= -np.log2(10) - 1e-4  # bounded by the uniform marginal


def test_mosaickd_adversarial_term_drives_the_generator_towards_disagreement(teacher, normalize):
    # Only the adversarial term on (a student that is a noisy copy of the teacher): G must find images
    # where they disagree, so KL(teacher || student) on its samples rises.
    synth = mosaickd(teacher, normalize, g_steps=40, local=0.0, align=0.0, balance=0.0, lr_d=1e-9)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p) if p.numel() > 1 else 0)
    synth.student = student
    synth.step()
    kl = -terms_over(synth, "adv")
    assert kl[-5:].mean() > 1.5 * kl[:5].mean(), kl


def test_mosaickd_trains_only_its_generator_and_discriminator(teacher, normalize):
    synth = mosaickd(teacher, normalize, g_steps=2)
    student = synth.student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    g_before = [p.clone() for p in synth.generator.parameters()]
    d_before = [p.clone() for p in synth.discriminator.parameters()]
    synth.step()
    assert all(p.grad is None for p in [*teacher.parameters(), *student.parameters()])
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # weights and BN buffers
    assert any(not torch.equal(a, b) for a, b in zip(g_before, synth.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, synth.discriminator.parameters()))
    assert all(p.requires_grad for p in synth.discriminator.parameters())  # unfrozen after G's step


def test_mosaickd_cosine_needs_the_run_length(teacher, normalize):
    synth = create_synthesizer({"method": "mosaickd", "wild": {"dataset": "digits-wild"}}, SHAPE, 10)
    with pytest.raises(ValueError, match="epochs=N"):
        synth.bind(teacher, create_model("digits_cnn_small", num_classes=10, in_channels=1), normalize)
    synth.bind(teacher, create_model("digits_cnn_small", num_classes=10, in_channels=1), normalize, epochs=2)
    factors = [s.lr_lambdas[0](c) for s in synth.schedulers[:1] for c in (0, 196, 392)]
    assert factors[0] == 1.0 and 0.4 < factors[1] < 0.6 and factors[2] == 0.0


def test_mosaickd_kd_batches_mix_synthetic_and_ood_images(teacher, normalize, wild):
    synth = mosaickd(teacher, normalize, synthetic_fraction=0.25)
    synth.begin_epoch(1, None)
    batch = next(iter(synth.batches(1, 64)))
    assert batch.shape == (64, *SHAPE) and batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1
    ood = batch[16:]  # the OOD share is real wild images (uint8 values exactly), the rest generated
    assert torch.equal((ood * 255).round(), ood * 255)
    wild_set = {bytes(img.numpy().tobytes()) for img in synth.wild.images}
    assert all(bytes((img * 255).round().to(torch.uint8).numpy().tobytes()) in wild_set for img in ood)
    assert synth.min_dictionary_images() == len(wild) + 64
    assert sum(len(b) for b in synth.dictionary_images()) == len(wild) + len(synth.pool)


# -- wild pools --------------------------------------------------------------------------------------
def test_a_streamed_wild_pool_gives_the_same_images_as_one_in_memory():
    held = WildImages(WildDataConfig(dataset="digits-wild", in_memory="on"), SHAPE).to("cpu")
    streamed = WildImages(WildDataConfig(dataset="digits-wild", in_memory="off"), SHAPE).to("cpu")
    assert held.images is not None and streamed.images is None
    for (row_a, a), (row_b, b) in zip(held.batches(500, 100, 2100), streamed.batches(500, 100, 2100)):
        assert row_a == row_b and torch.equal(a, b)
    draw = lambda pool: pool.sample(32, torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(held), draw(streamed))


def test_digits_wild_is_fixed_unlabelled_and_out_of_domain():
    a, b = load_dataset("digits-wild"), load_dataset("digits-wild")
    assert len(a) == 4041 and not a.labeled and np.array_equal(a.images, b.images)
    train = load_dataset("digits", split="train").images
    assert not any((a.images[i] == train).all(axis=(1, 2, 3)).any() for i in range(0, len(a), 97))


def test_any_image_folder_is_a_wild_pool(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "a" / "deeper" / "y.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "b" / "z.bmp")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    pool = load_pool("imagefolder", tmp_path, "all", image_size=8, channels=1)
    assert len(pool) == 3
    (batch,) = list(pool.iter_batches(8))
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == torch.uint8
    assert torch.equal(pool.gather(torch.tensor([2, 0])), batch[[2, 0]])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images under"):
        load_pool("imagefolder", tmp_path / "empty", "all")


def test_tiny_imagenet_is_the_wild_pool_of_the_cifar_teachers(shared_dir):
    cfg = WildDataConfig(dataset="tiny-imagenet", root=shared_dir / "data" / "tiny-imagenet-200-subset.tar.gz", limit=64)
    pool = WildImages(cfg, (3, 32, 32)).to("cpu")
    assert len(pool) == 64 and pool.images.shape == (64, 3, 32, 32) and pool.images.dtype == torch.uint8
