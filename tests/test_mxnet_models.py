"""The MXNet reader/executor (faceshield.models.graphs.mxnet) and InsightFace's MobileFaceNet y1 built on it:
validated against the TFLite conversion of the same network (LiteRT) on real faces, on hand-written params files
and on a small hand-built symbol; and the research-licence opt-in."""

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.errors import ShapeError
from faceshield.fileio import sha256_file
from faceshield.models import assets
from faceshield.models.fr.insightface_y1 import PARAMS_ASSET, REFERENCE_TFLITE, SYMBOL_ASSET
from faceshield.models.graphs.mxnet import (
    MXNetError, MXNetGraph, UnsupportedMXNetOpError, load_mxnet_graph, read_ndarray_list,
)
from faceshield.models.registry import RESEARCH_ENV, ResearchLicenceError, create_fr_model, get_fr_config

MODEL = "insightface-mobilefacenet-y1"
N_FACES = 8


def _crude_crop(path, size: int = 112) -> np.ndarray:
    """Central 70 % of an aligned CelebA-HQ 256×256 photo (close to ArcFace's crop), float RGB in [0, 1]."""
    img = Image.open(path).convert("RGB")
    side = round(img.width * 0.70)
    left, top = (img.width - side) // 2, (img.height - side) // 2 + round(0.05 * img.height)
    return np.asarray(img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR),
                      dtype=np.float32) / 255


@pytest.fixture(scope="module")
def faces(shared_data) -> dict[str, torch.Tensor]:
    return {s: torch.from_numpy(np.stack([_crude_crop(PAIRS / s / f"{i}.png") for i in pair_ids(N_FACES)]))
            .permute(0, 3, 1, 2).contiguous() for s in ("train", "test")}


@pytest.fixture(scope="module")
def y1():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RESEARCH_ENV, "1")
        return create_fr_model(MODEL)


def _tflite(path, x_nhwc: np.ndarray) -> np.ndarray:
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter", reason="install ai-edge-litert (reference)")
    interpreter = interpreter_mod.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for k in range(len(x_nhwc)):  # the file fixes batch 1
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(x_nhwc[k:k + 1], dtype=np.float32))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"]).copy())
    return np.concatenate(rows)


# --- InsightFace MobileFaceNet y1 -------------------------------------------------------------------------------


def test_y1_matches_tflite_on_real_faces(y1, faces):
    x = faces["train"]
    # InsightFace's input convention, written out independently of the zoo config: RGB in [0, 255], NHWC for
    # the TFLite file (the graph normalises itself).
    ref = _tflite(assets.fetch(REFERENCE_TFLITE), x.permute(0, 2, 3, 1).numpy() * 255)
    with torch.no_grad():
        ours = y1.raw(x).numpy()
    assert ours.shape == ref.shape == (N_FACES, 128)
    assert np.abs(ref).max() > 0.5
    assert np.abs(ours - ref).max() < 1e-4  # measured 4.5e-6 (magnitudes ~2.7)


def test_y1_separates_identities_and_is_differentiable(y1, faces):
    x = faces["train"].clone().requires_grad_(True)
    emb = y1(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(N_FACES), atol=1e-5, rtol=0)
    with torch.no_grad():
        cos = emb @ y1(faces["test"]).T
    same, diff = cos.diag(), cos[~torch.eye(N_FACES, dtype=torch.bool)]
    assert same.mean() - diff.mean() > 0.3, (same.mean().item(), diff.mean().item())
    (emb[0] @ emb[1]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[0].abs().sum() > 0
    assert not any(b.requires_grad for b in y1.buffers())


def test_y1_graph_structure(y1):
    graph = y1.network
    assert isinstance(graph, MXNetGraph) and graph.input_name == "data" and graph.output_name == "fc1"
    assert graph.op_counts() == {"_minus_scalar": 1, "_mul_scalar": 1, "Convolution": 49, "BatchNorm": 50,
                                 "LeakyReLU": 33, "elemwise_add": 12, "FullyConnected": 1}
    with pytest.raises(ShapeError, match="112"):
        y1(torch.rand(1, 3, 96, 96))


# --- research licence: declared, refused unless the user opts in ---------------------------------------------


def test_research_model_is_refused_without_opt_in(monkeypatch):
    monkeypatch.delenv(RESEARCH_ENV, raising=False)
    cfg = get_fr_config(MODEL)  # declared: listed with its licence
    assert "research" in cfg.licence and cfg.extra["research_only"]
    with pytest.raises(ResearchLicenceError) as err:
        create_fr_model(MODEL)
    message = str(err.value)
    assert "\n" not in message and MODEL in message and "research" in message and f"{RESEARCH_ENV}=1" in message
    monkeypatch.setenv(RESEARCH_ENV, "0")
    with pytest.raises(ResearchLicenceError):
        create_fr_model(MODEL)


def test_research_model_builds_with_opt_in(monkeypatch):
    monkeypatch.setenv(RESEARCH_ENV, "1")
    assert create_fr_model(MODEL).config.embedding_dim == 128


def test_research_model_not_in_default_lists_and_calibrated_apart(monkeypatch):
    from faceshield.eval.calibration import shipped_table
    from faceshield.models.registry import list_fr_models

    monkeypatch.delenv(RESEARCH_ENV, raising=False)
    table = shipped_table()
    assert MODEL in list_fr_models()
    assert MODEL not in table.strong_models() and MODEL not in table.surrogate_models()
    from importlib import resources

    data = json.loads(resources.files("faceshield").joinpath("data/calibration.json").read_text())
    cal = data["research_models"][MODEL]
    assert cal["auc"] > 0.95 and cal["n_genuine"] == data["meta"]["n_pairs"]


def test_y1_files_resolve_from_the_mirror_with_sha256():
    for name in (SYMBOL_ASSET, PARAMS_ASSET, REFERENCE_TFLITE):
        asset = assets.get_asset(name)
        assert "research" in asset.licence and asset.sources[0].describe().startswith(
            "https://github.com/ltkhang/EfficientFace/raw/36f6d5e/")
        path = assets.fetch(name)
        assert sha256_file(path) == asset.sha256 and path.stat().st_size == asset.size


# --- the .params reader on files written from the format description --------------------------------------------

_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2, np.dtype(np.uint8): 3,
          np.dtype(np.int32): 4, np.dtype(np.int8): 5, np.dtype(np.int64): 6}


def _array_bytes(a: np.ndarray, version: str) -> bytes:
    if version == "legacy":  # uint32 ndim + uint32 dims, no magic
        head = struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape)
    else:
        head = struct.pack("<I", 0xF993FAC9 if version == "v2" else 0xF993FAC8)
        if version == "v2":
            head += struct.pack("<i", 0)  # dense
        head += struct.pack(f"<i{a.ndim}q", a.ndim, *a.shape)
    return head + struct.pack("<iii", 1, 0, _FLAGS[a.dtype]) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def _params_file(path, arrays: dict[str, tuple[np.ndarray, str]]) -> None:
    blob = struct.pack("<QQQ", 0x112, 0, len(arrays))
    blob += b"".join(_array_bytes(a, v) for a, v in arrays.values())
    blob += struct.pack("<Q", len(arrays))
    for name in arrays:
        blob += struct.pack("<Q", len(name.encode())) + name.encode()
    path.write_bytes(blob)


def test_params_reader_round_trip_all_versions_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "arg:w": (rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "v2"),
        "arg:h": (rng.normal(size=(5,)).astype(np.float16), "v1"),
        "aux:i": (rng.integers(-9, 9, size=(2, 3)).astype(np.int32), "legacy"),
        "arg:d": (rng.normal(size=(3, 1)).astype(np.float64), "v2"),
        "arg:u": (np.arange(7, dtype=np.uint8), "v2"),
    }
    _params_file(tmp_path / "m.params", arrays)
    got = read_ndarray_list(tmp_path / "m.params")
    assert list(got) == list(arrays)
    for name, (a, _) in arrays.items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name], a)


def test_params_reader_refuses_bad_files(tmp_path):
    _params_file(tmp_path / "m.params", {"arg:w": (np.ones((2, 2), np.float32), "v2")})
    data = (tmp_path / "m.params").read_bytes()
    (tmp_path / "cut.params").write_bytes(data[:40])
    with pytest.raises(MXNetError, match="cut.params.*truncated"):
        read_ndarray_list(tmp_path / "cut.params")
    (tmp_path / "bad.params").write_bytes(b"\x00" * 24)
    with pytest.raises(MXNetError, match="bad.params.*not an MXNet NDArray file"):
        read_ndarray_list(tmp_path / "bad.params")


def test_real_params_file_matches_its_symbol():
    params = read_ndarray_list(assets.fetch(PARAMS_ASSET))
    symbol = json.loads(assets.fetch(SYMBOL_ASSET).read_text())
    assert len(params) == 284 and all(k.startswith(("arg:", "aux:")) for k in params)
    assert params["arg:fc1_weight"].shape == (128, 512) and params["arg:fc1_weight"].dtype == np.float32
    assert params["arg:conv_1_conv2d_weight"].shape == (64, 3, 3, 3)
    weights = {n["name"] for n in symbol["nodes"] if n["op"] == "null"} - {"data"}
    assert weights <= {k.split(":", 1)[1] for k in params}


# --- the executor on a small hand-built symbol, against torch written out here ---------------------------------


def _symbol(nodes: list[tuple[str, str, dict, list[int]]]) -> dict:
    return {"nodes": [{"op": op, "name": name, "attrs": attrs, "inputs": [[i, 0, 0] for i in inputs]}
                      for op, name, attrs, inputs in nodes],
            "arg_nodes": [], "heads": [[len(nodes) - 1, 0, 0]]}


def test_small_symbol_matches_torch_with_mxnet_defaults(tmp_path):
    """Grouped strided conv, BatchNorm with MXNet's defaults (eps 1e-3, fix_gamma true) and with explicit
    attributes, PReLU, scalar ops, residual add and a flattening FullyConnected."""
    rng = np.random.default_rng(1)
    p = {
        "w": rng.normal(size=(4, 2, 3, 3)), "g1": rng.uniform(0.5, 2, 4), "b1": rng.normal(size=4),
        "m1": rng.normal(size=4), "v1": rng.uniform(0.5, 2, 4), "g2": rng.uniform(0.5, 2, 4),
        "b2": rng.normal(size=4), "m2": rng.normal(size=4), "v2": rng.uniform(0.5, 2, 4),
        "a": rng.uniform(0.05, 0.5, 4), "fw": rng.normal(size=(3, 4 * 4 * 2)), "fb": rng.normal(size=3),
    }
    p = {k: v.astype(np.float32) for k, v in p.items()}
    nodes = [
        ("null", "data", {}, []),
        ("_minus_scalar", "sub", {"scalar": "0.5"}, [0]),
        ("_mul_scalar", "mul", {"scalar": "2.0"}, [1]),
        ("null", "w", {}, []),
        ("Convolution", "conv", {"kernel": "(3, 3)", "stride": "(2, 1)", "pad": "(1, 0)", "num_group": "2",
                                 "num_filter": "4", "no_bias": "True"}, [2, 3]),
        ("null", "g1", {}, []), ("null", "b1", {}, []), ("null", "m1", {}, []), ("null", "v1", {}, []),
        ("BatchNorm", "bn_default", {}, [4, 5, 6, 7, 8]),  # eps 1e-3 and fix_gamma true by default
        ("null", "g2", {}, []), ("null", "b2", {}, []), ("null", "m2", {}, []), ("null", "v2", {}, []),
        ("BatchNorm", "bn_explicit", {"eps": "2e-05", "fix_gamma": "False"}, [9, 10, 11, 12, 13]),
        ("null", "a", {}, []),
        ("LeakyReLU", "prelu", {"act_type": "prelu"}, [14, 15]),
        ("elemwise_add", "res", {}, [16, 9]),
        ("null", "fw", {}, []), ("null", "fb", {}, []),
        ("FullyConnected", "fc", {"num_hidden": "3"}, [17, 18, 19]),
    ]
    (tmp_path / "s-symbol.json").write_text(json.dumps(_symbol(nodes)))
    _params_file(tmp_path / "s.params", {f"{'aux' if k[0] in 'mv' else 'arg'}:{k}": (v, "v2") for k, v in p.items()})
    graph = load_mxnet_graph(tmp_path / "s-symbol.json", tmp_path / "s.params").double()

    t = {k: torch.from_numpy(v).double() for k, v in p.items()}
    x = torch.rand(2, 4, 7, 4, dtype=torch.float64)
    h = F.conv2d((x - 0.5) * 2.0, t["w"], stride=(2, 1), padding=(1, 0), groups=2)
    c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    bn1 = (h - c(t["m1"])) / torch.sqrt(c(t["v1"]) + 1e-3) + c(t["b1"])  # gamma fixed to 1
    bn2 = c(t["g2"]) * (bn1 - c(t["m2"])) / torch.sqrt(c(t["v2"]) + 2e-5) + c(t["b2"])
    act = torch.where(bn2 > 0, bn2, bn2 * c(t["a"]))
    expected = (act + bn1).flatten(1) @ t["fw"].T + t["fb"]
    torch.testing.assert_close(graph(x), expected, atol=1e-10, rtol=1e-10)
    xg = x[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(graph, (xg,), eps=1e-6, atol=1e-6)


def test_unsupported_op_names_op_node_and_file(tmp_path):
    nodes = [("null", "data", {}, []), ("Pooling", "pool0", {"kernel": "(2, 2)"}, [0])]
    (tmp_path / "odd-symbol.json").write_text(json.dumps(_symbol(nodes)))
    _params_file(tmp_path / "odd.params", {})
    with pytest.raises(UnsupportedMXNetOpError, match=r"odd-symbol.json.*Pooling \(node pool0\)"):
        load_mxnet_graph(tmp_path / "odd-symbol.json", tmp_path / "odd.params")
