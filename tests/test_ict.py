"""ICT-FaceKit head model: the converter on a synthetic checkout, the shipped file."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ft import ict as ict_module
from lightning_ft.errors import AssetError
from lightning_ft.flame import contour_rows
from lightning_ft.ict import ICT, SHIPPED_MODEL, SHIPPED_SHA256, sphere_fit

ROOT = Path(__file__).resolve().parent.parent
CONVERTER = ROOT / "tools" / "convert_ict.py"


def _convert(checkout, out, *extra):
    return subprocess.run([sys.executable, str(CONVERTER), str(checkout), str(out), *map(str, extra)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def synthetic_ict(tmp_path_factory):
    from lightning_ft.synthetic.ict_files import write_synthetic_ict

    return write_synthetic_ict(tmp_path_factory.mktemp("ict_checkout"), n_identities=3, seed=0)


@pytest.fixture(scope="module")
def converted(synthetic_ict, tmp_path_factory):
    out = tmp_path_factory.mktemp("ict_model") / "model.npz"
    run = _convert(synthetic_ict.checkout, out, "--layout", synthetic_ict.layout)
    assert run.returncode == 0, run.stderr
    return out, run.stdout


@pytest.fixture(scope="module")
def shipped():
    return ICT.load()


def _kept_obj_ids(s):
    return np.concatenate([np.arange(s.geometry[g][0], s.geometry[g][0] + s.geometry[g][1]) for g in s.kept])


# ----------------------------------------------------------------------------
# Converter round trip on the synthetic checkout


def test_converter_round_trip_vertices_and_shapes(synthetic_ict, converted):
    model = ICT.load(converted[0])
    kept = _kept_obj_ids(synthetic_ict)
    np.testing.assert_array_equal(model.kept_vertex_ids, kept)
    assert model.n_shape == 3 and model.expression_names == list(synthetic_ict.expressions_cm)
    neutral_m = synthetic_ict.neutral_cm[kept] / 100
    np.testing.assert_allclose(model.v_template.double().numpy(), neutral_m, atol=1e-7)
    for k in range(model.n_shape):
        shape = torch.zeros(1, model.n_shape)
        shape[0, k] = 1
        got = model(shape=shape)[0].double().numpy()
        np.testing.assert_allclose(got, synthetic_ict.identities_cm[k][kept] / 100, atol=2e-5)
    for j, name in enumerate(model.expression_names):
        expression = torch.zeros(1, model.n_exp)
        expression[0, j] = 1
        got = model(expression=expression)[0].double().numpy()
        np.testing.assert_allclose(got, synthetic_ict.expressions_cm[name][kept] / 100, atol=2e-5)


def test_converter_triangles_follow_the_obj_polygons(synthetic_ict, converted):
    with np.load(converted[0]) as z:
        faces, poly_ids, kept = z["faces"], z["face_polygon_ids"], z["kept_vertex_ids"]
    polys = [np.array([int(c.split("/")[0]) - 1 for c in line.split()[1:]])
             for line in (synthetic_ict.checkout / "FaceXModel" / "generic_neutral_mesh.obj").read_text().splitlines()
             if line.startswith("f ")]
    kept_polys = [p for g in synthetic_ict.kept for p in range(synthetic_ict.geometry[g][2],
                                                                 synthetic_ict.geometry[g][2] + synthetic_ict.geometry[g][3])]
    assert sorted(set(poly_ids.tolist())) == kept_polys
    assert faces.shape[0] == sum(len(polys[p]) - 2 for p in kept_polys)
    v = synthetic_ict.neutral_cm
    for f, p in zip(faces, poly_ids):
        corners = kept[f]
        assert set(corners) <= set(polys[p])
        # Same winding as the polygon: normals agree (Newell's normal for the polygon).
        q = v[polys[p]]
        newell = np.cross(q, np.roll(q, -1, axis=0)).sum(0)
        assert np.dot(np.cross(v[corners[1]] - v[corners[0]], v[corners[2]] - v[corners[0]]), newell) > 0
    dropped = set(range(len(v))) - set(kept.tolist())
    assert dropped and all(synthetic_ict.geometry[g][0] in dropped for g in ("eyelashes_left", "lacrimal_fluid_right"))


def test_converter_landmarks_and_determinism(synthetic_ict, converted, tmp_path):
    model = ICT.load(converted[0])
    lmk = model.landmarks68(model.v_template[None])[0].double().numpy()
    np.testing.assert_allclose(lmk, synthetic_ict.neutral_cm[synthetic_ict.lmk68] / 100, atol=1e-7)
    again = tmp_path / "again.npz"
    assert _convert(synthetic_ict.checkout, again, "--layout", synthetic_ict.layout).returncode == 0
    assert again.read_bytes() == converted[0].read_bytes()


def test_converter_refuses_a_broken_checkout(synthetic_ict, tmp_path):
    broken = tmp_path / "checkout"
    shutil.copytree(synthetic_ict.checkout / "FaceXModel", broken / "FaceXModel")
    obj = broken / "FaceXModel" / "identity001.obj"
    lines = obj.read_text().splitlines()
    first_v = next(i for i, line in enumerate(lines) if line.startswith("v "))
    obj.write_text("\n".join(lines[:first_v] + lines[first_v + 5:]))  # five vertices short
    out = tmp_path / "model.npz"
    run = _convert(broken, out, "--layout", synthetic_ict.layout)
    assert run.returncode == 1
    assert "identity001.obj" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("model.npz*"))
    run = _convert(tmp_path / "nowhere", out)
    assert run.returncode == 1 and "vertex_indices.json" in run.stderr and not out.exists()


# ----------------------------------------------------------------------------
# The shipped model


def test_shipped_file_loads_with_its_recorded_hash(shipped):
    assert SHIPPED_MODEL.stat().st_size <= 12 * 1024 * 1024
    assert shipped.sha256 == SHIPPED_SHA256
    assert (SHIPPED_MODEL.parent / "LICENSE").read_text().startswith("MIT License")
    assert shipped.n_shape == 100 and shipped.n_exp == 53 and len(shipped.expression_names) == 53
    assert {"jawOpen", "eyeBlink_L", "mouthSmile_R"} <= set(shipped.expression_names)
    V = shipped.n_vertices
    assert shipped.v_template.shape == (V, 3) and shipped.shapedirs.shape == (V, 3, 100)
    assert shipped.expdirs.shape == (V, 3, 53)
    faces = shipped.faces
    assert faces.dtype == torch.long and faces.min() >= 0 and faces.max() == V - 1
    assert torch.unique(faces).numel() == V  # every kept vertex is used by a triangle
    v = shipped.v_template.double()
    area = torch.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]], dim=1).norm(dim=1)
    assert (area > 0).all()
    # Meters, ICT's frame: a head about 25 cm wide, nose tip in front (+z).
    extent = v.max(0).values - v.min(0).values
    assert 0.15 < extent[0] < 0.35 and v[shipped.region_face, 2].max() > 0.12
    masks = shipped.region
    assert sum(int(m.sum()) for m in masks.values()) == V
    assert not (masks["eyeballs"] & masks["face"]).any()


def test_sha256_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    copy = tmp_path / "ict_face_model_light.npz"
    data = bytearray(SHIPPED_MODEL.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="sha256"):
        ICT.load(copy, expected_sha256=SHIPPED_SHA256)
    monkeypatch.setattr(ict_module, "SHIPPED_MODEL", copy)
    with pytest.raises(AssetError, match=str(copy)):
        ICT.load()


def test_forward_is_batched_and_differentiable(shipped):
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(3, 100, generator=g).requires_grad_()
    expression = torch.rand(3, 53, generator=g).requires_grad_()
    eye_pose = (0.3 * torch.randn(3, 6, generator=g)).requires_grad_()
    verts = shipped(shape, expression, eye_pose)
    assert verts.shape == (3, shipped.n_vertices, 3)
    one = shipped(shape[1:2], expression[1:2], eye_pose[1:2])
    torch.testing.assert_close(verts[1:2], one, atol=1e-6, rtol=0)
    verts.square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (shape, expression, eye_pose))
    # Linear in the weights: the model is v_template + D @ weights.
    lin = shipped(shape=2 * shape.detach()[:1]) - shipped.v_template
    torch.testing.assert_close(lin, 2 * (shipped(shape=shape.detach()[:1]) - shipped.v_template), atol=1e-6, rtol=0)


def test_eye_rotation_keeps_eyeballs_on_their_spheres(shipped):
    g = torch.Generator().manual_seed(1)
    shape = 2 * torch.randn(2, 100, generator=g)
    eye_pose = torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.0, 0.0], [0.2, -0.3, 0.1, -0.2, 0.35, 0.0]])
    still = shipped(shape=shape)
    turned = shipped(shape=shape, eye_pose=eye_pose)
    eyes = torch.zeros(shipped.n_vertices, dtype=torch.bool)
    for ids in shipped.eyeball_vertex_ids:
        eyes[torch.as_tensor(ids)] = True
    torch.testing.assert_close(turned[:, ~eyes], still[:, ~eyes], atol=0, rtol=0)
    assert (turned[:, eyes] - still[:, eyes]).norm(dim=-1).max() > 2e-3
    for e, ids in enumerate(shipped.eyeball_vertex_ids):
        ids = torch.as_tensor(ids)
        sclera = ids[shipped.sclera_fit_left if e == 0 else shipped.sclera_fit_right]
        centre, radius = sphere_fit(still[:, sclera].double())
        assert ((still[:, sclera].double() - centre[:, None]).norm(dim=-1) - radius[:, None]).abs().max() < 1e-3
        d_still = (still[:, ids].double() - centre[:, None]).norm(dim=-1)
        d_turned = (turned[:, ids].double() - centre[:, None]).norm(dim=-1)
        torch.testing.assert_close(d_turned, d_still, atol=2e-6, rtol=0)
    # Rotating the left eye about +y by 0.4 rad moves its iris (front) towards +x.
    left = torch.as_tensor(shipped.eyeball_vertex_ids[0])
    front = left[still[0, left, 2] > still[0, left, 2].max() - 2e-3]
    assert (turned[0, front, 0] - still[0, front, 0]).mean() > 3e-3


def test_eyeball_centres_follow_identity(shipped):
    shape = torch.zeros(2, 100)
    shape[1] = 3 * torch.randn(100, generator=torch.Generator().manual_seed(2))
    c = shipped._eyeball_centres(shipped(shape=shape))
    assert (c[1] - c[0]).norm(dim=-1).min() > 1e-4
    torch.testing.assert_close(c[0], shipped.eyeball_centres, atol=1e-6, rtol=0)
    assert c[0, 0, 0] > 0 > c[0, 1, 0]  # left eyeball on the subject's left (+x)


def test_landmarks_lie_on_the_surface(shipped):
    F = shipped.faces.shape[0]
    for faces, bary in ((shipped.lmk68_faces, shipped.lmk68_bary), (shipped.dynamic_faces, shipped.dynamic_bary),
                        (shipped.dense_faces, shipped.dense_bary)):
        if faces.numel() == 0:
            continue
        assert faces.min() >= 0 and faces.max() < F
        assert (bary >= -1e-6).all() and torch.allclose(bary.sum(-1), torch.ones(()), atol=1e-5)
    with np.load(SHIPPED_MODEL) as z:
        readme_ids = z["lmk68_vertex_ids"]
    np.testing.assert_array_equal(readme_ids[:5], [1225, 1888, 1052, 367, 1719])  # ICT README's list
    lmk = shipped.landmarks68(shipped.v_template[None])[0]
    torch.testing.assert_close(lmk, shipped.v_template[torch.as_tensor(readme_ids, dtype=torch.long)], atol=0, rtol=0)
    assert shipped.static_faces.shape == (51,) and shipped.dynamic_faces.shape == (79, 17)


def _yaw(deg):
    a = np.deg2rad(deg)
    return torch.tensor([[[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]], dtype=torch.float32)


def test_jaw_contour_follows_yaw(shipped):
    v = shipped.v_template[None]
    at = {deg: shipped.landmarks68(v, _yaw(deg))[0, :17] for deg in (0, 25, -25)}
    assert contour_rows(_yaw(25), 79).item() == 25 and contour_rows(_yaw(-25), 79).item() == 64
    assert (at[25] - at[0]).norm(dim=-1).max() > 5e-3
    # ICT's shape is left-right symmetric (its triangulation not exactly): yaw -a
    # is the mirror image of yaw +a up to a neighbouring vertex.
    mirror = at[-25].flip(0) * torch.tensor([-1.0, 1.0, 1.0])
    assert (mirror - at[25]).norm(dim=-1).max() < 6e-3 and (mirror - at[25]).norm(dim=-1).median() < 1e-4
    # Turned by +25 degrees the subject's left cheek (points 9..16) turns away:
    # its outline point is the outermost face point at its height in the view.
    R = _yaw(25)[0]
    face = (v[0, shipped.region_face] @ R.T)
    for p in (at[25][12:16] @ R.T):
        near = face[(face[:, 1] - p[1]).abs() < 3e-3]
        assert p[0] > near[:, 0].max() - 4e-3
    # The side turning towards the camera (the subject's right, points 0..7, at
    # +25 degrees) and the chin keep the README's jaw vertices.
    static = shipped.landmarks68(v)[0, :17]
    torch.testing.assert_close(at[25][:9], static[:9], atol=0, rtol=0)
    torch.testing.assert_close(at[-25][8:], static[8:], atol=0, rtol=0)
    # The inner 51 points do not depend on yaw.
    torch.testing.assert_close(shipped.landmarks68(v, _yaw(25))[0, 17:], shipped.landmarks68(v)[0, 17:])


# ----------------------------------------------------------------------------
# The mediapipe embedding


def test_mediapipe_embedding_covers_the_face_and_the_irises(shipped):
    idx = shipped.mediapipe_indices
    assert idx.numel() >= 300 and idx.unique().numel() == idx.numel()
    assert idx.min() >= 0 and idx.max() <= 477
    iris = idx >= 468
    assert iris.sum() >= 8
    on_eyeball = shipped.region_eyeballs[shipped.faces[shipped.dense_faces]].all(-1)
    assert torch.equal(on_eyeball, iris)  # iris points on the eyeballs, nothing else there
    # They turn with the eyes.
    eye_pose = torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.3, 0.0]])
    moved = shipped.dense_landmarks(shipped(eye_pose=eye_pose)) - shipped.dense_landmarks(shipped())
    assert (moved[0, iris].norm(dim=-1) > 2e-3).all() and (moved[0, ~iris].norm(dim=-1) == 0).all()


def test_mediapipe_embedding_agrees_with_facemesh_on_a_new_render(shipped):
    """FaceMesh on a render of an identity and view that the embedding was not
    built from lands where the embedded points project."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_emb", ROOT / "tools" / "build_ict_mediapipe_embedding.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    from lightning_ft.landmarks import MeshTracker
    from lightning_ft.cameras import project_screen
    from lightning_ft.render import render_shaded

    colours, shown = build.paint(shipped)
    shape = torch.as_tensor(np.random.default_rng(123).normal(size=100), dtype=torch.float32)[None]
    R = build._rotation(8.0, -5.0)
    with torch.no_grad():
        verts = shipped(shape=shape)[0].double().numpy()
    nose = shipped.landmarks68(shipped.v_template[None])[0, 27:36].double().numpy().mean(0)
    cam = torch.as_tensor(build.camera_vertices(verts, R, nose))[None]
    K = torch.tensor([[1000.0, 0, 255.5], [0, 1000.0, 255.5], [0, 0, 1]], dtype=torch.float64)
    rgb, mask = render_shaded(cam, shipped.faces[torch.as_tensor(shown)], K, 512, colors=torch.as_tensor(colours))
    image = ((rgb[0] + 0.45 * (1 - mask[0, ..., None])).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    with MeshTracker(static=True) as tracker:
        detected = tracker(image)
    assert detected is not None
    pts = shipped.dense_landmarks(torch.as_tensor(verts, dtype=torch.float32)[None])[0].double().numpy()
    uv = project_screen(torch.as_tensor(build.camera_vertices(pts, R, nose))[None], K)[0, :, :2].numpy()
    err = np.linalg.norm(uv - detected[shipped.mediapipe_indices.numpy()], axis=1)
    assert np.median(err) < 2.0 and np.percentile(err, 90) < 5.0
