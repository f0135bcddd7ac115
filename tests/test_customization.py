"""The customization attack harness: ISM/FDFR by real models on the real VGGFace2 set, end to end on the tiny SD,
and the set-method hook of ``protect``."""

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import DATA  # noqa: E402

VGG = DATA / "vggface2-n000050"
MODELS = ("mobilefacenet-ms1m",)


@pytest.fixture(scope="session")
def scorer(shared_data):
    from faceshield.eval.customization import Scorer, photo_files
    from faceshield.images import load_image

    return Scorer([load_image(p).rgb for p in photo_files(VGG / "set_A")], models=MODELS)


def test_ism_is_high_for_the_same_person_and_fdfr_zero_on_real_photos(scorer):
    from faceshield.eval.customization import photo_files
    from faceshield.eval.judge import judge_table
    from faceshield.images import load_image

    same = scorer.score([load_image(p).rgb for p in photo_files(VGG / "set_B")])
    other = scorer.score([load_image(p).rgb for p in sorted((DATA / "celebahq-pairs" / "train").glob("*.png"))[:4]])
    assert same["fdfr"] == 0 and other["fdfr"] == 0
    threshold = scorer.ensemble and __import__("faceshield.eval.calibration", fromlist=["x"]).shipped_table()
    t = threshold.models[MODELS[0]].threshold(1e-2)
    assert same["ism"][MODELS[0]] > t > other["ism"][MODELS[0]]
    for model, value in same["ism_judge"].items():
        assert value > judge_table().models[model].threshold(1e-2) > other["ism_judge"][model]
    assert same["detector_confidence"] > 0.9 and 0 <= same["brisque"] <= 100


def test_blank_images_have_no_face(scorer):
    result = scorer.score([np.full((64, 64, 3), 128, np.uint8)])
    assert result["fdfr"] == 1 and result["ism"] == {} and result["detector_confidence"] is None


@pytest.mark.parametrize("mode", ["lora", "dreambooth"])
def test_attack_runs_end_to_end_on_the_tiny_model(tmp_path, scorer, mode):
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.diffusion.testing import save_tiny_stable_diffusion
    from faceshield.eval.customization import AttackConfig, attack_customize

    folder = save_tiny_stable_diffusion(tmp_path / "sd")
    sd = load_stable_diffusion(folder)
    before = sum(float(p.detach().double().sum()) for p in sd.unet.parameters())
    config = AttackConfig(mode=mode, diffusion_model=str(folder), steps=2, n_images=2, sample_steps=2, resolution=64)
    report = attack_customize(VGG / "set_B", tmp_path / "run", config, scorer, sd=sd)
    assert set(report["prompts"]) == {"a photo of sks person", "a dslr portrait of sks person"}
    assert report["overall"]["n"] == 4 and report["overall"]["fdfr"] == 1.0  # random weights draw no faces
    assert len(list((tmp_path / "run" / "images").rglob("*.png"))) == 4
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["mode"] == mode
    assert "data:image/png;base64" in (tmp_path / "run" / "report.html").read_text()
    after = sum(float(p.detach().double().sum()) for n, p in sd.unet.named_parameters() if "lora_" not in n)
    changed = after != before
    assert changed == (mode == "dreambooth")  # LoRA trains adapters only
    assert mode == "dreambooth" or any("lora_" in n for n, _ in sd.unet.named_parameters())


def test_protect_hands_a_set_method_every_photo_at_once(tmp_path, shared_data, monkeypatch):
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.diffusion.testing import save_tiny_stable_diffusion
    from faceshield.methods.base import method_config
    from faceshield.methods.haa import ASPL
    from faceshield.protect import SET_NOTE, Protector, protect_paths

    folder = save_tiny_stable_diffusion(tmp_path / "sd")
    method = ASPL(method_config("aspl", resolution=64, outer_steps=1, surrogate_steps=1, pgd_steps=1,
                                surrogates=MODELS), model=load_stable_diffusion(folder))
    calls = []
    original = ASPL.protect_many
    monkeypatch.setattr(ASPL, "protect_many", lambda self, photos, *a, **k: calls.append(len(photos))
                        or original(self, photos, *a, **k))
    run = protect_paths([VGG / "set_B"], Protector(method), tmp_path / "out", progress=False)
    assert calls == [4]
    assert [r.status for r in run.records] == ["protected"] * 4 and run.records[0].note == SET_NOTE


# --- the commands, through click on the tiny model --------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from faceshield.diffusion.testing import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("cli-sd") / "tiny")


def invoke(*args):
    from click.testing import CliRunner

    from faceshield.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


ATTACK = ("--steps", 1, "--n-images", 1, "--sample-steps", 1, "--resolution", 64, "--fr-models", MODELS[0])
SET = ("--set", "resolution=64", "--set", "outer_steps=1", "--set", "surrogate_steps=1", "--set", "pgd_steps=1")


def test_cli_attack_customize_writes_images_and_the_reports(tmp_path, tiny_dir, shared_data):
    result = invoke("attack", "customize", VGG / "set_B", "-o", tmp_path / "run", "--mode", "lora",
                    "--diffusion-model", tiny_dir, *ATTACK)
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'run' / 'report.html'}" in result.output and "FDFR 100.0%" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["mode"] == "lora" and report["overall"]["n"] == 2
    assert set(report["overall"]) >= {"fdfr", "ism", "ism_judge", "detector_confidence", "brisque"}
    assert len(list((tmp_path / "run" / "images").rglob("*.png"))) == 2
    assert "<table" in (tmp_path / "run" / "report.html").read_text()


def test_cli_evaluate_customization_protects_attacks_and_tabulates(tmp_path, tiny_dir, shared_data):
    result = invoke("evaluate-customization", VGG / "set_B", "--methods", "aspl", "-o", tmp_path / "eval",
                    "--diffusion-model", tiny_dir, *ATTACK, *SET, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert list(summary["methods"]) == ["clean", "aspl"]
    assert summary["methods"]["clean"]["protect_seconds"] is None and summary["methods"]["aspl"]["protect_seconds"] > 0
    assert all(row["n"] == 2 and row["fdfr"] == 1.0 for row in summary["methods"].values())
    assert len(list((tmp_path / "eval" / "aspl" / "protected").glob("*.png"))) == 4
    assert (tmp_path / "eval" / "aspl" / "attack" / "report.html").is_file()
    assert "aspl" in (tmp_path / "eval" / "summary.html").read_text()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["methods"].keys() == {"clean", "aspl"}


def test_cli_protect_with_a_set_method_and_set_of(tmp_path, tiny_dir, shared_data):
    from PIL import Image

    from faceshield.protect import SET_NOTE

    result = invoke("protect", VGG / "set_B", "-o", tmp_path / "out", "--method", "aspl", "--diffusion-model",
                    tiny_dir, "--surrogates", MODELS[0], *SET, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)["photos"]
    assert [r["status"] for r in records] == ["protected"] * 4 and records[0]["note"] == SET_NOTE
    for photo in sorted((VGG / "set_B").glob("*.png")):
        out = np.asarray(Image.open(tmp_path / "out" / f"{photo.stem}_protected.png"), np.int16)
        change = np.abs(out - np.asarray(Image.open(photo), np.int16))
        assert 0 < change.max() <= round(255 * 0.025) + 1  # ASPL's budget, 0.05 in [-1, 1]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# one person\n{(VGG / 'set_B' / '0012_01.png').resolve()}\n")
    result = invoke("protect", VGG / "set_B" / "0071_01.png", "--set-of", listing, "-o", tmp_path / "two",
                    "--method", "aspl", "--diffusion-model", tiny_dir, "--surrogates", MODELS[0], *SET)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == ["0012_01_protected.png",
                                                                          "0071_01_protected.png"]
    assert "anti-customization set method" in result.output


def test_cli_errors_are_one_line(tmp_path, tiny_dir, shared_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n")
    cases = {
        "does not exist": ("attack", "customize", VGG / "set_B", "-o", tmp_path / "r1", "--diffusion-model",
                           tmp_path / "no-model", *ATTACK),
        "no photos found": ("attack", "customize", empty, "-o", tmp_path / "r2", "--diffusion-model", tiny_dir),
        "no photos found ": ("evaluate-customization", empty, "-o", tmp_path / "r3", "--diffusion-model", tiny_dir),
        "only set methods": ("evaluate-customization", VGG / "set_B", "--methods", "cloak", "-o", tmp_path / "r4"),
        "--set-of": ("protect", "--set-of", tmp_path / "empty.txt", "--method", "aspl"),
    }
    for needle, args in cases.items():
        result = invoke(*args)
        assert result.exit_code in (1, 2), (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert needle.strip() in result.output and (len(lines) == 1 or lines[0].startswith("Usage:")), result.output
