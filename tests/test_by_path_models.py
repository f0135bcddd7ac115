"""Models whose weights the user supplies by path: ArcFace IR-SE50, FaceNet (VGGFace2) and BiSeNet face parsing.

The public weights cannot be downloaded here, so each network gets deterministic random weights in exactly the
public checkpoint's key layout (:func:`faceshield.models.checkpoint.random_state_dict`), saved with ``torch.save``
as the public file is, and loaded back through the users' path (``create_fr_model(name, weights=PATH)``,
``$FACESHIELD_WEIGHTS``, a mirror folder, Diff-Privacy's ``fr_weights``/``face_parsing`` settings). Outputs are
compared with ``tests/data/*_reference.json``, written by ``benchmarks/validate_by_path_models.py`` from the
reference implementations (facexlib 0.3.0, facenet-pytorch 2.6.0) with the same weights and inputs.
"""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from faceshield.errors import AssetError, FaceshieldError
from faceshield.faces.parsing import DIFF_PRIVACY_FACE, BiSeNet, load_face_parser
from faceshield.models.checkpoint import random_state_dict
from faceshield.models.ensemble import FREnsemble
from faceshield.models.fr.facenet import InceptionResnetV1, checkpoint_layout
from faceshield.models.fr.ir_se50 import IRSE50
from faceshield.models.registry import cached_fr_model, create_fr_model, list_fr_models

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location(
    "validate_by_path_models", Path(__file__).parents[1] / "benchmarks" / "validate_by_path_models.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def fixture(name: str) -> dict:
    return json.loads((DATA / f"{name}_reference.json").read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The three random checkpoints, saved in the public files' format and names."""
    root = tmp_path_factory.mktemp("by-path")
    facenet = InceptionResnetV1()
    layouts = {"arcface_ir_se50": (IRSE50().state_dict(), "model_ir_se50.pth"),
               "facenet_vggface2": (checkpoint_layout(facenet, "vggface2"), "20180402-114759-vggface2.pt"),
               "bisenet_parsing": (BiSeNet().state_dict(), "79999_iter.pth")}
    paths = {}
    for name, (layout, file) in layouts.items():
        expected = fixture(name)
        assert {k: list(v.shape) for k, v in layout.items()} == expected["keys"], f"{name}: key layout drifted"
        paths[name] = root / file
        torch.save(random_state_dict(layout, expected["seed"]), paths[name])
    return paths


def _inputs(name: str) -> torch.Tensor:
    expected = fixture(name)
    x = bench.fixed_inputs(*expected["input_shape"][:1], expected["input_shape"][-1])
    assert x.flatten()[:8].tolist() == pytest.approx(expected["input_sample"], abs=1e-6)
    return x


@pytest.mark.parametrize("model, name", [("arcface-ir-se50", "arcface_ir_se50"),
                                         ("facenet-vggface2", "facenet_vggface2")])
def test_fr_models_loaded_by_path_match_their_reference_implementation(checkpoints, model, name):
    """Mechanism: the network, key layout and preprocessing ((x−0.5)/0.5 for IR-SE50, (255x−127.5)/128 for FaceNet)
    equal the reference's (a wrong normalisation, block or layer order → the embeddings differ)."""
    expected = fixture(name)
    fr = create_fr_model(model, weights=str(checkpoints[name]))
    with torch.no_grad():
        out = fr(_inputs(name))
    reference = torch.tensor(expected["output"]).view(expected["output_shape"])
    diff = float((out - reference).abs().max())
    print(f"{model}: max abs diff vs reference {diff:.2e}")
    assert diff < 1e-5


def test_bisenet_loaded_by_path_matches_the_reference_and_the_mask_is_the_non_background_probability(checkpoints):
    """Mechanisms: BiSeNet's logits equal the reference's; the soft face mask is the summed probability of every class
    but the background (Diff-Privacy's choice: reversed, i.e. the background probability, → fails)."""
    expected = fixture("bisenet_parsing")
    parser = load_face_parser(str(checkpoints["bisenet_parsing"]))
    x = _inputs("bisenet_parsing")
    with torch.no_grad():
        logits = parser.logits(x)
        mask = parser(x)
    reference = torch.tensor(expected["output"]).view(expected["output_shape"])
    diff = float((bench.parsing_sample(logits) - reference).abs().max())
    print(f"bisenet: max abs diff vs reference {diff:.2e}")
    assert diff < 1e-4
    assert DIFF_PRIVACY_FACE == tuple(range(1, 19))
    assert mask.shape == (1, 1, 512, 512)
    assert torch.allclose(mask, 1 - logits.softmax(1)[:, :1], atol=1e-5)
    assert float(mask.std()) > 1e-3  # the random network's mask varies over the image: the comparison has teeth


def test_by_path_models_are_listed_but_never_default_and_found_through_env_and_mirror(checkpoints, monkeypatch,
                                                                                      tmp_path, caplog):
    from faceshield.eval.calibration import shipped_table

    assert "arcface-ir-se50" not in list_fr_models() and "arcface-ir-se50" in list_fr_models(by_path=True)
    table = shipped_table()
    for name in ("arcface-ir-se50", "facenet-vggface2", "facenet-casia-webface"):
        assert name not in table.models and name not in table.surrogate_models() + table.strong_models()
    path = checkpoints["arcface_ir_se50"]
    monkeypatch.setenv("FACESHIELD_WEIGHTS", f"arcface-ir-se50={path}")
    with caplog.at_level(logging.INFO, logger="faceshield.models.assets"):
        by_env = create_fr_model("arcface-ir-se50")
    assert any("unpinned" in r.message and str(path) in r.message for r in caplog.records)  # its sha256 is logged
    monkeypatch.delenv("FACESHIELD_WEIGHTS")
    mirror = tmp_path / "mirror"
    (mirror / "arcface-ir-se50").mkdir(parents=True)
    (mirror / "arcface-ir-se50" / "model_ir_se50.pth").symlink_to(path)
    monkeypatch.setenv("FACESHIELD_MIRROR", str(mirror))
    by_mirror = create_fr_model("arcface-ir-se50")
    x = _inputs("arcface_ir_se50")
    with torch.no_grad():
        assert torch.equal(by_env(x), by_mirror(x))
    # The CASIA-WebFace file has the same layout but a 10575-class head, which is accepted and unused.
    casia = tmp_path / "20180408-102900-casia-webface.pt"
    torch.save(random_state_dict(checkpoint_layout(InceptionResnetV1(), "casia-webface"), 1), casia)
    with torch.no_grad():
        out = create_fr_model("facenet-casia-webface", weights=str(casia))(torch.rand(1, 3, 160, 160))
    assert out.shape == (1, 512) and torch.allclose(out.norm(dim=1), torch.ones(1))


def test_models_list_shows_source_licence_file_and_how_to_pass_it():
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    listing = json.loads(CliRunner().invoke(cli, ["models", "list", "--json"]).output)
    fr = {m["name"]: m for m in listing["fr_models"]}
    for name in ("arcface-ir-se50", "facenet-vggface2", "facenet-casia-webface"):
        assert fr[name]["weights_by_path"] and fr[name]["auc"] is None and "MIT" in fr[name]["licence"]
    files = {f["name"]: f for f in listing["by_path_files"]}
    assert set(files) == {"arcface-ir-se50/model_ir_se50.pth", "facenet-vggface2/20180402-114759-vggface2.pt",
                          "facenet-casia-webface/20180408-102900-casia-webface.pt", "face-parsing-bisenet/79999_iter.pth"}
    assert "timesler/facenet-pytorch/releases" in files["facenet-vggface2/20180402-114759-vggface2.pt"]["sources"][0]
    assert all(len(f["sha256"]) == 64 for f in listing["files"])  # the fetchable files stay pinned
    text = CliRunner().invoke(cli, ["models", "list"]).output
    assert "arcface-ir-se50" in text and "weights by path, uncalibrated" in text
    from faceshield.eval.verify import resolve_models  # no threshold, no verdict: said as such, not "unknown"
    with pytest.raises(FaceshieldError, match="arcface-ir-se50: weights supplied by path are uncalibrated"):
        resolve_models("dlib-resnet,arcface-ir-se50")


def test_missing_corrupt_and_mismatched_weights_give_one_line_errors(checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv("FACESHIELD_WEIGHTS", raising=False)
    monkeypatch.setenv("FACESHIELD_MIRROR", str(tmp_path / "empty"))
    monkeypatch.setenv("FACESHIELD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as missing:
        create_fr_model("arcface-ir-se50")
    message = str(missing.value)
    assert "\n" not in message and "model_ir_se50.pth" in message and "TreB1eN/InsightFace_Pytorch" in message
    assert "FACESHIELD_WEIGHTS=arcface-ir-se50=PATH" in message
    monkeypatch.setenv("FACESHIELD_WEIGHTS", f"arcface-ir-se50={tmp_path / 'typo.pth'}")
    with pytest.raises(AssetError, match="typo.pth: no such file"):
        create_fr_model("arcface-ir-se50")
    monkeypatch.delenv("FACESHIELD_WEIGHTS")
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    result = CliRunner().invoke(cli, ["models", "fetch", "facenet-vggface2"])
    assert result.exit_code != 0 and "FACESHIELD_WEIGHTS=facenet-vggface2=PATH" in result.output
    with pytest.raises(AssetError, match="79999_iter.pth not found"):
        load_face_parser(str(tmp_path / "79999_iter.pth"))

    corrupt = tmp_path / "20180402-114759-vggface2.pt"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(AssetError) as bad:
        create_fr_model("facenet-vggface2", weights=str(corrupt))
    assert "\n" not in str(bad.value) and str(corrupt) in str(bad.value)

    state = torch.load(checkpoints["facenet_vggface2"], weights_only=True)
    state["repeat_1.0.branch0.conv.kernel"] = state.pop("repeat_1.0.branch0.conv.weight")  # a renamed key
    renamed = tmp_path / "renamed.pt"
    torch.save(state, renamed)
    with pytest.raises(AssetError) as mismatch:
        create_fr_model("facenet-vggface2", weights=str(renamed))
    message = str(mismatch.value)
    assert "\n" not in message and str(renamed) in message and "repeat_1.0.branch0.conv.weight" in message
    with pytest.raises(AssetError, match="not a ArcFace IR-SE50"):  # a FaceNet file given to IR-SE50
        create_fr_model("arcface-ir-se50", weights=str(checkpoints["facenet_vggface2"]))

    from faceshield.methods.diff_privacy import DiffPrivacyConfig
    from faceshield.settings import SettingError

    with pytest.raises(SettingError, match="NAME=PATH"):
        DiffPrivacyConfig(fr_models=("arcface-ir-se50",), fr_weights=("model_ir_se50.pth",))
    with pytest.raises(SettingError, match="fr_models does not list"):
        DiffPrivacyConfig(fr_weights=("arcface-ir-se50=/x/model_ir_se50.pth",))


def test_by_path_models_are_differentiable_inside_the_ensemble(checkpoints):
    models = [cached_fr_model("arcface-ir-se50", "cpu", str(checkpoints["arcface_ir_se50"])),
              cached_fr_model("facenet-vggface2", "cpu", str(checkpoints["facenet_vggface2"]))]
    ensemble = FREnsemble(models)
    image = torch.rand(1, 3, 128, 128, requires_grad=True)
    landmarks = torch.tensor([[[44.0, 52.0], [84.0, 52.0], [64.0, 76.0], [48.0, 98.0], [80.0, 98.0]]])
    out = ensemble(image, landmarks)
    assert set(out) == {"arcface-ir-se50", "facenet-vggface2"} and all(e.shape == (1, 512) for e in out.values())
    sum(e.sum() for e in out.values()).backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------- Diff-Privacy


@pytest.fixture(scope="module")
def tiny_dp(tmp_path_factory, checkpoints):
    pytest.importorskip("diffusers")
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.diffusion.testing import save_tiny_stable_diffusion
    from faceshield.methods.diff_privacy import DiffPrivacy, DiffPrivacyConfig

    folder = save_tiny_stable_diffusion(tmp_path_factory.mktemp("dp-by-path") / "sd")
    config = DiffPrivacyConfig(diffusion_model=str(folder), image_size=64, variants=2, anonymize_steps=5,
                               anonymize_strength=1.0, background_switch=1000, fr_models=("arcface-ir-se50",),
                               fr_weights=(f"arcface-ir-se50={checkpoints['arcface_ir_se50']}",),
                               face_parsing=str(checkpoints["bisenet_parsing"]))
    return DiffPrivacy(config, load_stable_diffusion(str(folder)))


def _prepared(dp, masks):
    from faceshield.methods.diff_privacy import PreparedFaces

    sd = dp.model
    crops = bench.fixed_inputs(1, 64)
    with torch.no_grad():
        clean = sd.encode_images(crops).float()
    width = sd.text_encoder.get_input_embeddings().weight.shape[1]
    tokens = torch.randn(1, 10, width, generator=torch.Generator().manual_seed(0))
    return PreparedFaces(crops, clean, tokens, masks=masks)


def test_ir_se50_by_path_is_diff_privacys_energy_model(tiny_dp):
    """Mechanism: ``--set fr_models=arcface-ir-se50 fr_weights=arcface-ir-se50=PATH`` makes the user's IR-SE50 the
    energy model, and the anonymization energy's gradient reaches the image through it."""
    from faceshield.methods.diff_privacy import anonymization_energy

    dp = tiny_dp
    assert dp.ensemble.names == ["arcface-ir-se50"]
    faces = bench.fixed_inputs(2, 64).requires_grad_(True)
    reference = {k: v.detach() for k, v in dp._identity(faces.flip(-1)).items()}
    energy = anonymization_energy(dp._identity(faces), reference, variants=2)
    energy.backward()
    assert float(energy.detach()) > 0 and float(faces.grad.abs().sum()) > 0
    generated = dp.anonymize_faces(_prepared(dp, dp.crop_masks(bench.fixed_inputs(1, 64))))
    assert len(generated.energy) == 5 and all(e == e for e in generated.energy)


def test_face_parsing_mask_drives_the_background_mask(tiny_dp):
    """Mechanism: with ``face_parsing`` the background latent mask is the BiSeNet parsing of the crop (average-pooled
    to the latent grid), not the landmark ellipse: latents where the parsing says background end as the clean latent
    (ignoring the parsing mask → they do not)."""
    import torch.nn.functional as F

    dp = tiny_dp
    crops = bench.fixed_inputs(1, 64)
    parsed = dp.crop_masks(crops)
    assert torch.allclose(parsed, load_face_parser(dp.config.face_parsing)(crops))
    f = dp.model.vae_factor
    assert torch.allclose(dp.latent_mask(parsed), F.avg_pool2d(parsed, f))
    # A parsing result with a hard edge (left half face, right half background) makes the check exact.
    half = torch.zeros(1, 1, 64, 64)
    half[..., :32] = 1
    prepared = _prepared(dp, half)
    z = dp.anonymize_faces(prepared).latents
    clean = prepared.clean.repeat_interleave(2, 0)
    w = z.shape[-1]
    assert torch.equal(z[..., w // 2:], clean[..., w // 2:])  # parsing background: exactly the clean latent
    assert float((z[..., : w // 2 - 1] - clean[..., : w // 2 - 1]).abs().mean()) > 1e-3  # the face: generated
    # The paste mask is the same parsing, warped back into the photo (not the ellipse): the photo pixels whose crop
    # position is parsing background keep their exact values, the others take the generated face.
    from faceshield.faces.align import warp_back

    photo = bench.fixed_inputs(1, 96)
    landmarks = (dp.template * 0.75 + 12)[None]
    _, matrices = dp.crops_of(photo, landmarks)
    faces = torch.zeros(1, 3, 64, 64)
    out = dp.paste(photo, faces, landmarks, matrices, half)
    alpha = warp_back(half, matrices, (96, 96))
    assert torch.equal(out[..., alpha[0, 0] == 0], photo[..., alpha[0, 0] == 0])
    assert float(out[..., alpha[0, 0] > 0.99].abs().max()) < 0.02 and bool((alpha[0, 0] == 0).any())


def test_recovery_of_a_key_made_with_parsing_pastes_through_the_parsing_of_the_recovered_face(tiny_dp, checkpoints,
                                                                                              monkeypatch):
    """Mechanism: the key records ``face_parsing``; recovery (whose config has none) finds BiSeNet through
    ``$FACESHIELD_WEIGHTS`` and pastes through the parsing of the recovered face (key flag ignored → ellipse)."""
    import dataclasses

    from faceshield.methods.diff_privacy import DiffPrivacy
    from faceshield.methods.recovery_key import RecoveryKey

    dp = DiffPrivacy(dataclasses.replace(tiny_dp.config, face_parsing=""), tiny_dp.model)
    prepared = _prepared(dp, None)
    photo = bench.fixed_inputs(1, 96)
    landmarks = (dp.template * 0.75 + 12)[None]
    _, matrices = dp.crops_of(photo, landmarks)
    path = dp.hide_path()
    key = RecoveryKey({"noise": torch.randn_like(prepared.clean), "tokens": prepared.tokens,
                       "landmarks": landmarks.double(), "matrices": matrices.double()},
                      {"format": "faceshield-diff-privacy", "photo_size": [96, 96], "image_size": 64, "path": path,
                       "face_parsing": True})
    pasted = []
    monkeypatch.setattr(dp, "paste", lambda image, faces, lm, mats, masks=None: pasted.append((faces, masks)) or image)
    monkeypatch.setenv("FACESHIELD_WEIGHTS", f"face-parsing-bisenet={checkpoints['bisenet_parsing']}")
    dp.recover(photo, key)
    faces, masks = pasted[-1]
    assert masks is not None and torch.allclose(masks, load_face_parser(str(checkpoints["bisenet_parsing"]))(faces))
    key.meta["face_parsing"] = False
    dp.recover(photo, key)
    assert pasted[-1][1] is None
