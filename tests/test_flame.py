import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_ft.errors import AssetError
from lightning_ft.flame import FLAME, contour_rows, load_flame_model, load_landmark_embedding, read_pickle


def _random_params(B, seed, max_angle=0.5):
    g = torch.Generator().manual_seed(seed)
    u = lambda n: (torch.rand(B, n, generator=g) * 2 - 1) * max_angle  # noqa: E731
    return dict(shape=torch.randn(B, 100, generator=g), expression=torch.randn(B, 50, generator=g),
                global_pose=u(3), neck_pose=u(3), jaw_pose=u(3), eye_pose=u(6))


@pytest.fixture(scope="module")
def smplx_flame(flame_files):
    smplx = pytest.importorskip("smplx")
    return smplx.FLAME(str(flame_files.smplx_folder), num_betas=100, num_expression_coeffs=50,
                       use_face_contour=True, batch_size=16)


def _smplx_forward(m, p):
    return m(betas=p["shape"], expression=p["expression"], global_orient=p["global_pose"],
             neck_pose=p["neck_pose"], jaw_pose=p["jaw_pose"], leye_pose=p["eye_pose"][:, :3],
             reye_pose=p["eye_pose"][:, 3:])


def test_vertices_match_smplx(flame_model, smplx_flame):
    p = _random_params(16, seed=1)
    ours = flame_model(**p).vertices
    ref = _smplx_forward(smplx_flame, p).vertices
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5


def test_lmk68_match_smplx(flame_model, smplx_flame):
    # smplx picks the contour row from the global rotation alone, DECA (whose
    # file format this is) from global @ neck: compare with the neck at rest.
    p = _random_params(16, seed=2)
    p["neck_pose"] = torch.zeros(16, 3)
    ours = flame_model(**p).lmk68
    ref = _smplx_forward(smplx_flame, p).joints[:, 5:]  # 51 static, then 17 contour
    ref = torch.cat([ref[:, 51:], ref[:, :51]], dim=1)  # iBUG order: contour first
    assert (ours - ref).abs().max().item() < 1e-5


def test_static_landmarks_match_smplx_with_neck(flame_model, smplx_flame):
    p = _random_params(16, seed=3)
    ours = flame_model(**p).lmk68[:, 17:]
    ref = _smplx_forward(smplx_flame, p).joints[:, 5:56]
    assert (ours - ref).abs().max().item() < 1e-5


def test_contour_follows_head_yaw_of_global_and_neck(flame_model):
    # DECA's convention: row = yaw of global @ neck in whole degrees; rows
    # 0..39 for yaw 0..39, rows 40..78 for yaw -1..-39.
    yaw = torch.tensor([[0.0, 0.3, 0.0]])
    row = lambda **kw: contour_rows(flame_model.head_rotation(flame_model.pose_vector(1, **kw)), 79).item()  # noqa: E731
    assert row(global_pose=yaw) == round(np.degrees(0.3))
    assert row(global_pose=-yaw) == 39 + round(np.degrees(0.3))
    assert row(global_pose=yaw / 2, neck_pose=yaw / 2) == row(global_pose=yaw)
    assert row(global_pose=torch.tensor([[0.0, 1.2, 0.0]])) == 39  # clamped
    assert row(global_pose=torch.tensor([[0.0, -1.2, 0.0]])) == 78


def test_omitted_parameters_mean_zero(flame_model):
    a = flame_model().vertices
    b = flame_model(shape=torch.zeros(1, 100), expression=torch.zeros(1, 50), jaw_pose=torch.zeros(1, 3)).vertices
    assert torch.equal(a, b)
    assert torch.allclose(a[0], flame_model.v_template, atol=1e-7)


def test_sizes_come_from_the_files(flame_files, flame_model):
    data = load_flame_model(flame_files.model)
    assert flame_model.n_vertices == data.v_template.shape[0] != 5023
    assert flame_model.faces.shape[0] == data.faces.shape[0]
    assert flame_model.n_dense == 105
    assert data.parents == (-1, 0, 1, 1, 1)


def test_loads_without_chumpy_and_reads_the_stub_array(flame_files, tmp_path):
    # A subprocess where importing chumpy fails: the loader must not need it.
    code = (
        "import sys; sys.modules['chumpy'] = None\n"
        "from lightning_ft.flame import load_flame_model\n"
        f"d = load_flame_model(r'{flame_files.model}')\n"
        "print(d.shapedirs.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "(1214, 3, 400)" in out.stdout or ", 3, 400)" in out.stdout
    raw = open(flame_files.model, "rb").read()
    assert b"chumpy.ch" in raw and b"scipy.sparse" in raw  # the released structure


def test_real_embedding_files_load(real_embedding_dir):
    if real_embedding_dir is None:
        pytest.skip("../shared/real-assets not beside this checkout")
    emb = load_landmark_embedding(real_embedding_dir / "landmark_embedding.npy")
    assert emb.dynamic_faces.shape == (79, 17) and emb.static_faces.shape == (51,)
    from lightning_ft.flame import load_mediapipe_embedding

    mp = load_mediapipe_embedding(real_embedding_dir / "mediapipe_landmark_embedding.npz")
    assert mp.faces.shape == (105,) and mp.mediapipe_indices.max() < 478


def test_real_topology_stand_in(real_embedding_dir, tmp_path):
    if real_embedding_dir is None:
        pytest.skip("../shared/real-assets not beside this checkout")
    from lightning_ft.synthetic.flame_files import write_synthetic_flame

    f = write_synthetic_flame(tmp_path, template_obj=real_embedding_dir / "head_template_mesh.obj",
                              real_embeddings=real_embedding_dir)
    m = FLAME(f.model, f.landmark_embedding, f.mediapipe_embedding)
    lmk = m().lmk68[0]
    # iBUG order on a frontal face: jaw from the subject's right (-x) to left,
    # right eye outer corner left of the left eye outer corner, nose tip in front.
    assert lmk[0, 0] < lmk[8, 0] < lmk[16, 0]
    assert lmk[36, 0] < lmk[45, 0]
    assert lmk[30, 2] > lmk[36, 2]
    assert lmk[8, 1] < lmk[30, 1] < lmk[27, 1]


def test_truncated_pickle_is_a_clear_asset_error(flame_files, tmp_path):
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(flame_files.model.read_bytes()[:5000])
    with pytest.raises(AssetError, match="generic_model.pkl"):
        load_flame_model(bad)


def test_wrong_structure_is_a_clear_asset_error(tmp_path):
    bad = tmp_path / "generic_model.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"v_template": np.zeros((10, 3))}, f, protocol=2)
    with pytest.raises(AssetError, match="missing keys"):
        load_flame_model(bad)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    bad = tmp_path / "generic_model.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"v_template": _Evil()}, f, protocol=2)
    with pytest.raises(AssetError, match="refuses"):
        read_pickle(bad)


def test_too_many_components_requested(flame_files):
    with pytest.raises(AssetError, match="expression components"):
        FLAME(flame_files.model, flame_files.landmark_embedding, flame_files.mediapipe_embedding, n_exp=101)
