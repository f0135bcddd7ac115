"""aspl and haa (anti-customization set methods) on the tiny Stable Diffusion, with real VGGFace2 photos.

Each mechanism has a test that fails when it is removed or reversed (docs/mechanisms.md, "HAA / ASPL")."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import DATA  # noqa: E402

from faceshield.errors import DiffusionModelError  # noqa: E402

SIZE = 64
SET_B = DATA / "vggface2-n000050" / "set_B"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory, faces):
    """The tiny SD with its VAE's scaling factor set as SD's was chosen: latents of unit std on photos (the
    random VAE's latents are ~0.04 otherwise, and the ε-MSE would not see the images at all)."""
    import json

    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.diffusion.testing import save_tiny_stable_diffusion

    folder = save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny")
    sd = load_stable_diffusion(folder)
    with torch.no_grad():
        std = float((sd.encode_images(faces[0]) / sd.latent_scale).std())
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["scaling_factor"] = 1 / std
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def faces(shared_data):
    """Two real photos of one person at 64² and their RetinaFace landmarks (working pixels)."""
    from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor
    from faceshield.images import load_image, to_tensor

    detector = create_detector("retinaface")
    images, marks = [], []
    for path in sorted(SET_B.glob("*.png"))[:2]:
        rgb = load_image(path).rgb
        assert rgb.shape[0] == rgb.shape[1]
        images.append(F.interpolate(to_tensor(rgb), size=(SIZE, SIZE), mode="bilinear", antialias=True,
                                    align_corners=False))
        marks.append(landmark_tensor(detect_faces(rgb, detector))[:1] * (SIZE / rgb.shape[0]))
    return torch.cat(images).clamp(0, 1), marks


def make(name, sd_dir, **overrides):
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.methods.base import get_method_class, method_config

    settings = {"resolution": SIZE, "outer_steps": 2, "surrogate_steps": 1, "pgd_steps": 2, **overrides}
    return get_method_class(name)(method_config(name, **settings), model=load_stable_diffusion(sd_dir))


def fixed_draws(sd, latents, seed=123, k=4):
    from faceshield.diffusion.finetune import draw_noise

    generator = torch.Generator().manual_seed(seed)
    return [draw_noise(sd, latents, generator) for _ in range(k)]


# --- the update rule ---------------------------------------------------------------------------------------------
def test_momentum_update_is_mu_g_plus_l1_normalised_gradient():
    from faceshield.methods.haa import momentum_update

    g = torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    grad = torch.tensor([[3.0, -1.0, 0.0, 0.0], [-200.0, 100.0, 0.0, 100.0]])
    out = momentum_update(g, grad, 0.9)
    expected = torch.tensor([[0.9 + 0.75, -0.9 - 0.25, 1.8, 0.0], [0.45 - 0.5, 0.45 + 0.25, 0.45, 0.45 + 0.25]])
    assert torch.allclose(out, expected)
    # the sign after two steps depends on both mechanisms: a huge first gradient does not drown a small second one
    two = momentum_update(momentum_update(torch.zeros(1, 2), torch.tensor([[1000.0, -1000.0]]), 1.0),
                          torch.tensor([[-3.0, 1.0]]), 1.0)
    assert torch.allclose(two, torch.tensor([[0.5 - 0.75, -0.5 + 0.25]]))


def test_projection_keeps_the_budget_and_the_pixel_range():
    from faceshield.methods.haa import project

    clean = torch.tensor([0.0, 0.5, 0.99, 1.0])
    out = project(torch.tensor([-0.3, 0.3, 0.3, -0.01]), clean, 0.1)
    assert torch.allclose(out, torch.tensor([0.0, 0.1, 0.01, -0.01]))


# --- ASPL's alternation -----------------------------------------------------------------------------------------
def test_alternation_trains_a_copy_on_the_clean_set_then_the_surrogate_on_the_protected_set(
        tiny_sd_dir, faces, monkeypatch):
    from faceshield.diffusion import finetune

    images, marks = faces
    method = make("aspl", tiny_sd_dir)
    events = []
    original_train, original_restore = finetune.Finetuner.train, finetune.Finetuner.restore

    def train(self, latents, steps, generator):
        events.append(("train", latents.clone(), [p.detach().clone() for p in self.params]))
        return original_train(self, latents, steps, generator)

    def restore(self, state):
        original_restore(self, state)
        events.append(("restore", state, [p.detach().clone() for p in self.params]))

    pgd = []
    original_pgd = type(method).pgd_step
    monkeypatch.setattr(finetune.Finetuner, "train", train)
    monkeypatch.setattr(finetune.Finetuner, "restore", restore)
    monkeypatch.setattr(type(method), "pgd_step",
                        lambda self, *a: pgd.append(len(events)) or original_pgd(self, *a))
    protected, history = method.protect_set(images, marks)
    assert [e[0] for e in events] == ["train", "restore", "train"] * 2
    assert pgd == [1, 1, 4, 4]  # the PGD steps run against the copy, after its training on set A
    clean_latents = finetune.encode_for_training(method.model, images)
    for k in (0, 3):  # the copy learns the clean set
        assert torch.allclose(events[k][1], clean_latents)
    for k in (2, 5):  # the surrogate learns the protected set, from the weights before the copy's training
        assert not torch.allclose(events[k][1], clean_latents, atol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(events[k][2], events[k - 2][2]))
    assert not all(torch.equal(a, b) for a, b in zip(events[3][2], events[0][2]))  # and it did learn
    assert len(history["surrogate_loss_protected"]) == 2


def test_aspl_raises_the_surrogates_denoising_loss_above_the_clean_and_the_sign_flipped_sets(tiny_sd_dir, faces,
                                                                                               monkeypatch):
    """The same run with the PGD direction flipped (descent) is the control: on a random tiny UNet the loss moves by
    ~1 %, so the ascent is compared with its mirror under the same surrogate and draws, not only with the clean set."""
    from faceshield.diffusion.finetune import denoising_loss, encode_for_training
    from faceshield.methods.haa import ASPL

    images, marks = faces
    settings = {"epsilon": 0.1, "step_size": 0.02, "outer_steps": 2, "pgd_steps": 4}
    method = make("aspl", tiny_sd_dir, **settings)
    ascended, _ = method.protect_set(images, marks)
    objective = ASPL.objective
    monkeypatch.setattr(ASPL, "objective", lambda self, *a: (lambda g, t: (-g, t))(*objective(self, *a)))
    descended, _ = make("aspl", tiny_sd_dir, **settings).protect_set(images, marks)
    sd, tuner = method.model, method.last["finetuner"]
    emb = tuner.embeddings([method.config.instance_prompt]).detach().expand(len(images), -1, -1)
    losses = []
    with torch.no_grad():
        latents = [encode_for_training(sd, x) for x in (images, ascended, descended)]
        draws = fixed_draws(sd, latents[0], k=16)  # the same timesteps and noise for every set
        for z in latents:
            losses.append(float(torch.stack([denoising_loss(sd, z, emb, t, n)[0] for t, n in draws]).mean()))
    clean, up, down = losses
    assert up > clean and up - down > 0.01 * clean, losses  # measured: up − down ≈ 1.9 % of the clean loss


# --- HAA's reward terms -----------------------------------------------------------------------------------------
def test_differentiable_brisque_matches_opencvs_and_has_true_gradients(faces):
    from faceshield.diffusion.rewards import brisque_torch
    from faceshield.eval.quality import brisque
    from faceshield.images import load_image, to_tensor

    for path in sorted(SET_B.glob("*.png"))[:2]:
        x = to_tensor(load_image(path).rgb)
        assert abs(float(brisque_torch(x)) - brisque(x)) < 2.5
    x = faces[0][:1].double().requires_grad_(True)
    (grad,) = torch.autograd.grad(brisque_torch(x).sum(), x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        numeric = (brisque_torch(x + h * direction) - brisque_torch(x - h * direction)) / (2 * h)
    assert float(numeric) == pytest.approx(float((grad * direction).sum()), rel=1e-3)


def test_anti_aesthetic_loss_is_the_papers_batch_standardised_exp_reward():
    """r = |RM(x_o) − RM(x̂)| − RM(x̂), R = (r − mean r)/std r (constants), loss = mean exp(R): values by hand."""
    from faceshield.diffusion.rewards import anti_aesthetic_loss

    clean = torch.tensor([0.9, 0.5, 0.7])
    reward = torch.tensor([0.6, 0.8, 0.7], requires_grad=True)
    loss = anti_aesthetic_loss(clean, reward)  # r = (−0.3, −0.5, −0.7): mean −0.5, std 0.2, R = (1, 0, −1)
    e = torch.e
    assert float(loss.detach()) == pytest.approx((e + 1 + 1 / e) / 3, rel=1e-4)
    (grad,) = torch.autograd.grad(loss, reward)
    # ∂L/∂r_i = exp(R_i)/(3·0.2); ∂r/∂RM(x̂) = −2 below the clean reward, 0 above it, −1 at it (|·|'s subgradient 0)
    expected = torch.tensor([e * -2, 0.0, (1 / e) * -1]) / 0.6
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture
def x0_is_the_image(monkeypatch):
    """A fixed differentiable map x̂₀ = the perturbed image itself (no UNet): the regime where the reward terms are
    active on real photos (RM(x̂₀) ≤ RM(x_o) from the first step on), so what is tested is HAA's reward update."""
    from faceshield.methods.haa import HAA

    monkeypatch.setattr(HAA, "one_step_prediction", lambda self, tuner, images, generator: (images.sum() * 0, images))


def face_masks(marks):
    from faceshield.faces.masks import face_mask_from_landmarks

    return torch.stack([face_mask_from_landmarks(m, SIZE).amax(0) for m in marks])


def term_rewards(method, images, boxes):
    """(global reward of the whole images, local reward of the face crops), means over the set."""
    from faceshield.methods.haa import crops

    with torch.no_grad():
        return (float(method.reward(images).mean()),
                float(method.reward(crops(images, boxes, method.config.local_size)).mean()))


@pytest.mark.parametrize("term", ["global", "local"])
def test_each_reward_term_has_a_gradient_and_lowers_its_reward_under_the_update(tiny_sd_dir, faces, term,
                                                                                 x0_is_the_image):
    images, marks = faces
    weights = {"global_weight": 1.0 if term == "global" else 0.0, "local_weight": 1.0 if term == "local" else 0.0}
    method = make("haa", tiny_sd_dir, denoise_weight=0.0, surrogate_steps=0, outer_steps=1, pgd_steps=5,
                  epsilon=0.05, step_size=0.01, **weights)
    state = method.start(images, face_masks(marks))
    grad, _ = method.objective(None, images, torch.zeros_like(images), state, torch.Generator())
    assert float(grad.abs().sum()) > 0 and bool(torch.isfinite(grad).all())
    protected, history = method.protect_set(images, marks)
    before = term_rewards(method, images, state["boxes"])
    after = term_rewards(method, protected, state["boxes"])
    index = 0 if term == "global" else 1
    assert after[index] < before[index] - 0.05, (before, after)  # worse quality = higher BRISQUE where it looks
    assert history[f"loss_{term}"][-1] > history[f"loss_{term}"][0]


def test_the_local_term_changes_the_face_region_more_than_the_rest(tiny_sd_dir, faces, x0_is_the_image):
    images, marks = faces
    method = make("haa", tiny_sd_dir, denoise_weight=0.0, global_weight=0.0, local_weight=1.0, surrogate_steps=0,
                  outer_steps=1, pgd_steps=3, epsilon=0.05, step_size=0.01)
    protected, _ = method.protect_set(images, marks)
    change = (protected - images).abs()
    inside = face_masks(marks).expand_as(change) > 0.5
    ratio = float(change[inside].mean()) / max(float(change[~inside].mean()), 1e-12)
    assert float(change[inside].mean()) > 0.25 * method.config.epsilon and ratio > 10, ratio


def test_each_reward_term_has_a_gradient_through_the_tiny_surrogate(tiny_sd_dir, faces):
    """Through encode → UNet → one-step x̂₀ → decode. The regime: a face crop of 1.5× the landmark ellipse at 64 px
    (the default 1× ellipse at 64 px is a ~30 px crop blown up to 128, whose BRISQUE is worse than the random
    model's x̂₀: there r is flat, as the paper's formula says it should be)."""
    from faceshield.diffusion.finetune import Finetuner
    from faceshield.faces.masks import face_mask_from_landmarks

    images, marks = faces
    masks = torch.stack([face_mask_from_landmarks(m, SIZE, scale=1.5).amax(0) for m in marks])
    grads = {}
    for term in ("global", "local"):
        method = make("haa", tiny_sd_dir, denoise_weight=0.0, global_weight=float(term == "global"),
                      local_weight=float(term == "local"), mask_scale=1.5, local_size=64)
        state = method.start(images, masks)
        tuner = Finetuner(method.model, method.finetune_config())
        grads[term], terms = method.objective(tuner, images, torch.zeros_like(images), state,
                                              torch.Generator().manual_seed(0))
        assert terms[f"reward_{term}"] < float(state[f"{term}_clean"].mean())  # RM(x̂₀) < RM(x_o): active
    for term, grad in grads.items():
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, term
    assert float(grads["local"].abs()[(masks == 0).expand_as(grads["local"])].max()) == 0.0  # face only


def test_pgd_step_is_the_sign_of_momentum_over_l1_normalised_gradients_then_the_projection(tiny_sd_dir,
                                                                                           monkeypatch):
    """Two steps with planted gradients, against values by hand: a huge first gradient must not drown the second
    (L1 normalisation), the first must still count (momentum μ = 1), and δ stays in the budget and [0, 1]."""
    from faceshield.methods.haa import HAA

    method = make("haa", tiny_sd_dir, epsilon=0.05, step_size=0.03, momentum=1.0)
    planted = [torch.tensor([[1000.0, -1000.0, 1000.0, 1000.0]]), torch.tensor([[-3.0, 1.0, 0.5, 0.5]])]
    monkeypatch.setattr(HAA, "objective", lambda self, *a: (planted.pop(0), {}))
    clean = torch.tensor([[0.5, 0.5, 0.5, 0.99]])
    state = {"momentum": torch.zeros_like(clean)}
    delta, _ = method.pgd_step(None, clean, torch.zeros_like(clean), state, None)
    assert torch.allclose(delta, torch.tensor([[0.03, -0.03, 0.03, 0.01]]))
    # momentum (0.25, −0.25, 0.25, 0.25) + (−0.6, 0.2, 0.1, 0.1) → signs (−, −, +, +)
    delta, _ = method.pgd_step(None, clean, delta, state, None)
    assert torch.allclose(delta, torch.tensor([[0.0, -0.05, 0.05, 0.01]]), atol=1e-7)


# --- budget, photos, errors --------------------------------------------------------------------------------------
def test_linf_budget_holds_on_the_full_photo_and_only_its_centred_square_changes(tiny_sd_dir, faces):
    images, marks = faces
    method = make("haa", tiny_sd_dir, outer_steps=1, pgd_steps=3, step_size=0.02)
    photo = F.pad(images[:1], (0, 0, 8, 8), mode="replicate")  # 80×64: the square is rows 8..72
    landmarks = marks[0] + torch.tensor([0.0, 8.0])
    (result,) = method.protect_many([(photo, landmarks)])
    change = (result.image - photo).abs()
    assert result.image.shape == photo.shape
    assert float(change.max()) <= method.config.epsilon + 1e-6
    assert float(change.max()) > 0.9 * method.config.epsilon
    assert float(change[..., :8, :].max()) == 0.0 and float(change[..., 72:, :].max()) == 0.0


def test_out_of_memory_is_one_clear_line(tiny_sd_dir, faces, monkeypatch):
    from faceshield.diffusion import finetune

    images, marks = faces
    method = make("aspl", tiny_sd_dir, outer_steps=1)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(finetune, "unet_epsilon", boom)
    with pytest.raises(finetune.DeviceMemoryError) as info:
        method.protect_set(images, marks)
    message = str(info.value)
    assert "\n" not in message and "out of memory" in message and "mode=lora" in message


def test_missing_weights_are_one_clear_line(tiny_sd_dir, faces, tmp_path):
    from faceshield.methods.base import create_method

    with pytest.raises(DiffusionModelError) as info:
        create_method("aspl", diffusion_model=str(tmp_path / "nowhere")).model
    assert "\n" not in str(info.value) and "does not exist" in str(info.value)
    method = make("haa", tiny_sd_dir, reward_model="laion", reward_path=str(tmp_path / "missing.pth"),
                  reward_clip=str(tmp_path / "noclip"))
    with pytest.raises(DiffusionModelError) as info:
        method.protect_set(*faces)
    assert "\n" not in str(info.value) and "CLIP" in str(info.value)


def test_laion_aesthetic_predictor_loads_from_files_and_is_differentiable(tmp_path, faces):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from faceshield.diffusion.rewards import AestheticMLP, load_laion_aesthetic

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(tmp_path / "clip")
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "mlp.pth")
    scorer = load_laion_aesthetic(tmp_path / "mlp.pth", str(tmp_path / "clip"))
    scorer.size = 32
    x = faces[0].clone().requires_grad_(True)
    scores = scorer(x)
    assert scores.shape == (2,)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert float(grad.abs().sum()) > 0
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(DiffusionModelError, match="expects 768-D"):
        load_laion_aesthetic(tmp_path / "l14.pth", str(tmp_path / "clip"))
