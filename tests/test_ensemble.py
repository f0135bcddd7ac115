"""The surrogate ensemble's speed paths give exactly the answers of the plain ones.

The attack's gradient is computed model by model on worker threads (``FREnsemble.map_models``,
``IdentityObjective.loss_and_grad``), fooled models skip their backward, subnormal weights are zeroed at load and
PReLU runs through ``F.prelu``. Each test fails when its speed-up changes a result.
"""

import threading

import pytest
import torch

from conftest import PAIRS, pair_ids
from faceshield.adversarial import IdentityObjective
from faceshield.images import to_tensor
from faceshield.models.ensemble import FREnsemble
from faceshield.models.graphs import flush_subnormals_, prelu

SURROGATES = ("mobileface", "mobilefacenet-ms1m", "dlib-resnet")


@pytest.fixture(scope="module")
def scene(face_rgb):
    from faceshield.faces.detect import best_face_landmarks, default_detector

    landmarks = best_face_landmarks(face_rgb, default_detector())
    image = to_tensor(face_rgb)
    noisy = (image + 0.06 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return FREnsemble(SURROGATES), image, noisy, landmarks


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _reference(objective: IdentityObjective, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and gradient the plain way: one graph through every model, one backward."""
    x = image.clone().requires_grad_(True)
    loss = objective.loss(objective.similarities(x))
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("kind", ["dodging", "impersonation", "plain cosine"])
def test_loss_and_grad_equal_one_backward_through_the_mean_loss(scene, kind):
    ensemble, image, noisy, landmarks = scene
    thresholds = None if kind == "plain cosine" else {"mobileface": 0.3, "mobilefacenet-ms1m": 0.3, "dlib-resnet": 0.9}
    target = None
    if kind == "impersonation":  # toward another person
        from faceshield.faces.detect import best_face_landmarks, default_detector
        from faceshield.images import load_image

        other = load_image(PAIRS / "train" / f"{pair_ids(2)[1]}.png").rgb
        target = ensemble.embed(to_tensor(other), best_face_landmarks(other, default_detector()))
    objective = IdentityObjective(ensemble, image, landmarks, target, thresholds, margin=0.5)
    loss, grad = _with_threads(2, lambda: objective.loss_and_grad(noisy))
    ref_loss, ref_grad = _reference(objective, noisy)
    assert float(ref_loss) > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


def test_a_model_already_fooled_skips_its_backward_and_the_gradient_stays_exact(scene):
    """dlib's threshold above its cosine on the noisy photo: its term is 0 (past the margin), so its backward is not
    run, and the gradient is still the mean over all three models (the others' sum divided by 3)."""
    ensemble, image, noisy, landmarks = scene
    thresholds = {"mobileface": 0.3, "mobilefacenet-ms1m": 0.3, "dlib-resnet": 0.9999}
    objective = IdentityObjective(ensemble, image, landmarks, None, thresholds, margin=0.5)
    backwards = []
    hook = ensemble.models["dlib-resnet"].register_full_backward_hook(lambda *args: backwards.append(1))
    try:
        loss, grad = _with_threads(2, lambda: objective.loss_and_grad(noisy))
        assert not backwards
        ref_loss, ref_grad = _reference(objective, noisy)
    finally:
        hook.remove()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


def test_map_models_runs_each_model_on_a_worker_in_order_deterministically_and_keeps_no_grad(scene):
    ensemble, image, noisy, landmarks = scene
    seen_threads = []

    def embed(name: str) -> torch.Tensor:
        seen_threads.append(threading.current_thread().name)
        x = noisy.clone().requires_grad_(True)
        return ensemble.models[name](ensemble.align(x, landmarks, name))

    one = _with_threads(1, lambda: ensemble.map_models(embed))
    assert set(seen_threads) == {threading.current_thread().name}
    seen_threads.clear()
    two = _with_threads(2, lambda: ensemble.map_models(embed))
    assert all(t.startswith("fr-model") for t in seen_threads) and len(seen_threads) == len(SURROGATES)
    assert list(two) == list(ensemble.names) == list(one)
    for name in SURROGATES:  # each model runs on one thread either way: bit for bit the same embeddings
        assert torch.equal(one[name], two[name]), name
    with torch.no_grad():
        quiet = _with_threads(2, lambda: ensemble.map_models(embed))
    assert not any(v.requires_grad for v in quiet.values()), "the caller's no_grad did not reach the workers"
    assert all(v.requires_grad for v in two.values())


@pytest.mark.parametrize("shape, channel_dim, slope_shape, one_kernel", [
    ((2, 8, 5, 5), 1, (8, 1, 1), True),     # ONNX, NCHW, per channel (C×1×1)
    ((2, 8, 5, 5), 1, (1,), True),          # one shared slope
    ((2, 5, 5, 8), -1, (8,), True),         # TF.js, NHWC, per channel
    ((2, 8), 1, (8,), True),                # after a MatMul
    ((2, 8, 5, 5), 1, (5,), False),         # broadcast over the last axis (W), not per channel: the general path
])
def test_prelu_equals_the_definition_with_its_gradient(shape, channel_dim, slope_shape, one_kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, requires_grad=True)
    slope = torch.rand(slope_shape, generator=g) * 0.5
    ours = prelu(x, slope, channel_dim)
    expected = torch.where(x < 0, x * slope, x)
    assert _graph_has(ours.grad_fn, "Prelu") == one_kernel
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    weights = torch.randn(shape, generator=g)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (g_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(g_ours, g_expected, rtol=0, atol=0)


def _graph_has(node, name: str, depth: int = 3) -> bool:
    if node is None or depth < 0:
        return False
    return name in type(node).__name__ or any(_graph_has(n, name, depth - 1) for n, _ in node.next_functions)


def test_subnormal_weights_are_zeroed_and_nothing_else_changes():
    tiny = torch.finfo(torch.float32).tiny
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = tiny / 4
        conv.weight[0, 0, 0, 1] = -tiny / 8
        conv.weight[0, 0, 0, 2] = tiny  # the smallest normal number stays
    before = conv.weight.detach().clone()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        out_before = conv(x)
    assert flush_subnormals_(conv) == 2
    assert conv.weight[0, 0, 0, 0] == 0 and conv.weight[0, 0, 0, 1] == 0 and conv.weight[0, 0, 0, 2] == tiny
    changed = conv.weight.detach() != before
    assert int(changed.sum()) == 2
    with torch.no_grad():
        assert float((conv(x) - out_before).abs().max()) < 1e-30


def test_the_zoo_loads_without_subnormal_weights():
    """faceplugin-mobilefacenet's ONNX file holds 8,938 subnormal weights; they made its convolutions twice as slow."""
    from faceshield.models.registry import cached_fr_model

    model = cached_fr_model("faceplugin-mobilefacenet", "cpu")
    tiny = torch.finfo(torch.float32).tiny
    left = sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in [*model.parameters(), *model.buffers()]
               if t.is_floating_point())
    assert left == 0
