"""Camera conversions against independent constructions from each convention's documentation."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from lightning_ft import cameras as cam


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def random_extrinsics(rng, n=5):
    """Heads about 0.5 m in front of an OpenCV camera, facing it."""
    R = Rotation.from_rotvec(rng.normal(scale=0.3, size=(n, 3))).as_matrix() @ np.diag([1.0, -1.0, -1.0])
    t = np.stack([rng.uniform(-0.05, 0.05, n), rng.uniform(-0.05, 0.05, n), rng.uniform(0.4, 0.8, n)], 1)
    return R, t


def test_opengl_c2w_is_camera_pose_with_flipped_axes(rng):
    R, t = random_extrinsics(rng)
    c2w = cam.opencv_to_opengl_c2w(R, t)
    X = rng.normal(scale=0.1, size=(5, 7, 3))
    # Independent: an OpenGL camera sees x right, y up and looks along -z.
    x_gl = np.einsum("bij,bnj->bni", np.linalg.inv(c2w)[:, :3, :3], X) + np.linalg.inv(c2w)[:, None, :3, 3]
    x_cv = np.einsum("bij,bnj->bni", R, X) + t[:, None]
    np.testing.assert_allclose(x_gl, x_cv * [1, -1, -1], atol=1e-12)
    # The last column is the camera centre -R^T t; the camera looks at the head (along -z_gl).
    centre = -np.einsum("bji,bj->bi", R, t)
    np.testing.assert_allclose(c2w[:, :3, 3], centre, atol=1e-12)
    assert np.all(x_gl[..., 2] < 0)


def test_opengl_round_trip(rng):
    R, t = random_extrinsics(rng)
    R2, t2 = cam.opengl_c2w_to_opencv(cam.opencv_to_opengl_c2w(R, t))
    np.testing.assert_allclose(R2, R, atol=1e-12)
    np.testing.assert_allclose(t2, t, atol=1e-12)


def pytorch3d_screen_projection(X, R_p3d, T_p3d, focal_ndc, pp_ndc, H, W):
    """PyTorch3D PerspectiveCameras(in_ndc=True).transform_points_screen, from its docs:
    row vectors X_view = X R + T; NDC x = f X/Z + p (+x left, +y up, the shorter
    side spans [-1, 1]); screen has its origin at the top-left corner, so pixel
    i's centre is at screen i + 0.5."""
    Xv = np.einsum("bnj,bjk->bnk", X, R_p3d) + T_p3d[:, None]
    ndc = focal_ndc[:, None] * Xv[..., :2] / Xv[..., 2:3] + pp_ndc[:, None]
    s = min(H, W) / 2.0
    return np.stack([W / 2.0 - ndc[..., 0] * s, H / 2.0 - ndc[..., 1] * s], -1)


# PyTorch3D screen coordinates measure from the image corner; ours put pixel
# centres on integers (render.py, landmarks), so screen = ours + 0.5.
PYTORCH3D_SCREEN_OFFSET = 0.5


@pytest.mark.parametrize("H,W", [(256, 256), (240, 320), (400, 300)])
def test_pytorch3d_projection_matches_opencv(rng, H, W):
    R, t = random_extrinsics(rng)
    focal = np.array([700.0, 690.0])
    pp = np.array([W / 2 + 7.5, H / 2 - 3.25])
    X = rng.normal(scale=0.1, size=(5, 11, 3))
    px_cv = cam.project_opencv(X, R, t, cam.intrinsic_matrix(focal, pp)[None])
    R_p3d, T_p3d = cam.opencv_to_pytorch3d(R, t)
    f_ndc, p_ndc = cam.pixel_to_ndc_intrinsics(focal, pp, [H, W])
    screen = pytorch3d_screen_projection(X, R_p3d, T_p3d, np.broadcast_to(f_ndc, (5, 2)),
                                         np.broadcast_to(p_ndc, (5, 2)), H, W)
    np.testing.assert_allclose(screen - PYTORCH3D_SCREEN_OFFSET, px_cv, atol=1e-9)
    # Independent projection with the plain pinhole formula.
    x = np.einsum("bij,bnj->bni", R, X) + t[:, None]
    np.testing.assert_allclose(px_cv, focal * x[..., :2] / x[..., 2:] + pp, atol=1e-9)


def pytorch3d_pixel_centre_ndc(i, S):
    """NDC of the centre of pixel i (counted from the image's left/top) along a
    side of S pixels, as PyTorch3D's rasterizer samples it (rasterize_meshes.py:
    pix_to_ndc(S - 1 - i, S) = -1 + (2 (S-1-i) + 1)/S, NDC +x pointing left)."""
    return -1.0 + (2.0 * (S - 1 - i) + 1.0) / S


@pytest.mark.parametrize("H,W", [(128, 128), (96, 160)])
def test_ndc_principal_point_is_the_pixel_pytorch3d_rasterizes_there(H, W):
    # A principal point on the centre of pixel (37, 51) must become the NDC
    # position at which PyTorch3D's rasterizer samples that pixel, scaled by
    # the non-square NDC range (the shorter side spans [-1, 1]).
    pp = np.array([37.0, 51.0])
    _, p_ndc = cam.pixel_to_ndc_intrinsics([500.0, 500.0], pp, [H, W])
    s = min(H, W)
    expected = [pytorch3d_pixel_centre_ndc(37, W) * W / s, pytorch3d_pixel_centre_ndc(51, H) * H / s]
    np.testing.assert_allclose(p_ndc, expected, atol=1e-12)
    # The image centre is NDC (0, 0).
    _, p0 = cam.pixel_to_ndc_intrinsics([500.0, 500.0], cam.centred_principal_point([H, W]), [H, W])
    np.testing.assert_allclose(p0, [0.0, 0.0], atol=1e-12)


def test_pytorch3d_round_trip_and_axes(rng):
    R, t = random_extrinsics(rng)
    R_p3d, T_p3d = cam.opencv_to_pytorch3d(R, t)
    R2, t2 = cam.pytorch3d_to_opencv(R_p3d, T_p3d)
    np.testing.assert_allclose(R2, R, atol=1e-12)
    np.testing.assert_allclose(t2, t, atol=1e-12)
    # A point straight ahead of an OpenCV camera is straight ahead (+z) in PyTorch3D too,
    # and a point to the image right (+x OpenCV) is at -x (PyTorch3D's +x is left).
    X_world = np.einsum("bji,bj->bi", R, np.array([0.1, 0.0, 1.0]) - t)
    Xv = np.einsum("bj,bjk->bk", X_world, R_p3d) + T_p3d
    np.testing.assert_allclose(Xv, np.broadcast_to([-0.1, 0.0, 1.0], (5, 3)), atol=1e-12)


def test_ndc_pixel_round_trip(rng):
    H, W = 180, 240
    f_ndc, p_ndc = cam.pixel_to_ndc_intrinsics([500.0, 520.0], [100.0, 90.0], [H, W])
    s = min(H, W) / 2
    np.testing.assert_allclose(f_ndc, [500 / s, 520 / s])
    # Pixel centre 100 is 100.5 from the left edge, the centre line 120 from it.
    np.testing.assert_allclose(p_ndc, [-(100.5 - W / 2) / s, -(90.5 - H / 2) / s])
    f, p = cam.ndc_to_pixel_intrinsics(f_ndc, p_ndc, [H, W])
    np.testing.assert_allclose(f, [500, 520])
    np.testing.assert_allclose(p, [100, 90])
    pp = rng.uniform(0, 200, size=(6, 2))
    f2, p2 = cam.ndc_to_pixel_intrinsics(*cam.pixel_to_ndc_intrinsics(np.full((6, 2), 300.0), pp, [H, W]), [H, W])
    np.testing.assert_allclose(p2, pp, atol=1e-12)


def test_corner_and_centre_pixel_conventions():
    np.testing.assert_allclose(cam.centred_principal_point([4, 6]), [2.5, 1.5])
    xy = np.array([[0.0, 0.0], [-0.5, 3.25]])
    np.testing.assert_allclose(cam.opencv_to_corner_pixels(xy), xy + 0.5)
    np.testing.assert_allclose(cam.corner_to_opencv_pixels(cam.opencv_to_corner_pixels(xy)), xy)


def test_rotation_6d_is_first_two_rows_and_decodes(rng):
    R = Rotation.from_rotvec(rng.normal(size=(6, 3))).as_matrix()
    d6 = cam.matrix_to_rotation_6d(R)
    np.testing.assert_array_equal(d6[:, :3], R[:, 0])
    np.testing.assert_array_equal(d6[:, 3:], R[:, 1])
    np.testing.assert_allclose(cam.rotation_6d_to_matrix(d6), R, atol=1e-12)
    noisy = cam.rotation_6d_to_matrix(d6 * 1.7 + rng.normal(scale=0.05, size=d6.shape))
    np.testing.assert_allclose(noisy @ np.swapaxes(noisy, 1, 2), np.broadcast_to(np.eye(3), (6, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(noisy), 1.0, atol=1e-12)


def test_axis_angle_matches_scipy(rng):
    aa = rng.normal(size=(8, 3))
    aa[0] = 0.0
    np.testing.assert_allclose(cam.axis_angle_to_matrix(aa), Rotation.from_rotvec(aa).as_matrix(), atol=1e-12)
    back = cam.matrix_to_axis_angle(cam.axis_angle_to_matrix(aa))
    np.testing.assert_allclose(cam.axis_angle_to_matrix(back), Rotation.from_rotvec(aa).as_matrix(), atol=1e-12)


def test_fov_focal_inverse():
    fov = cam.focal_to_fov(600.0, 512)
    assert np.isclose(np.tan(fov / 2), 256 / 600)
    assert np.isclose(cam.fov_to_focal(fov, 512), 600.0)
