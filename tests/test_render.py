"""Tests of the PyTorch rasterizer (lightning_ft/render.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import points_in_poly

from lightning_ft.cameras import project_screen
from lightning_ft.errors import LightningFTError
from lightning_ft.render import (DECA_SH_CONSTANTS, antialias, face_adjacency, interpolate,
                                 rasterize, render_shaded, sh_shading,
                                 vertex_normals)

torch.set_num_threads(1)


def icosphere(subdivisions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices [V,3], faces [F,3] counter-clockwise from outside."""
    t = (1 + 5 ** 0.5) / 2
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t),
             (0, -1, -t), (0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4),
             (11, 10, 2), (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8),
             (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [np.array(v, float) / np.linalg.norm(v) for v in verts]
    for _ in range(subdivisions):
        cache: dict = {}

        def midpoint(i, j):
            key = (min(i, j), max(i, j))
            if key not in cache:
                m = verts[i] + verts[j]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        new_faces = []
        for a, b, c in faces:
            ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
            new_faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new_faces
    return np.array(verts), np.array(faces, dtype=np.int64)


def sphere_in_front(size: int, subdivisions: int = 1, dtype=torch.float64):
    """An icosphere of radius 0.1 m at z = 0.5 m and intrinsics filling ~60% of the image."""
    verts, faces = icosphere(subdivisions)
    verts_cam = torch.tensor(verts * 0.1 + [0.0, 0.0, 0.5], dtype=dtype)[None]
    focal = 0.3 * size * 0.4 / 0.1
    K = torch.tensor([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1]],
                     dtype=dtype)
    return verts_cam, torch.from_numpy(faces), K


def screen_triangle(points_uv, z=(1.0, 1.0, 1.0), dtype=torch.float64):
    uv = torch.tensor(points_uv, dtype=dtype)
    return torch.cat([uv, torch.tensor(z, dtype=dtype)[:, None]], dim=1)[None]


def pixel_centres(H, W):
    ys, xs = np.mgrid[0:H, 0:W]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)


@pytest.mark.parametrize("clockwise", [False, True])
def test_triangle_covers_exactly_the_pixels_whose_centres_lie_inside(clockwise):
    H, W = 23, 31
    tri_uv = [[3.3, 2.7], [27.6, 9.2], [11.1, 20.4]]
    if clockwise:
        tri_uv = tri_uv[::-1]
    frags = rasterize(screen_triangle(tri_uv), torch.tensor([[0, 1, 2]]), (H, W))
    expected = points_in_poly(pixel_centres(H, W), np.array(tri_uv)).reshape(H, W)
    assert expected.sum() > 100
    np.testing.assert_array_equal(frags.face_idx[0].numpy() == 0, expected)
    assert (frags.face_idx[0][~torch.from_numpy(expected)] == -1).all()


def test_backface_culling_keeps_only_triangles_facing_the_camera():
    # Seen from the camera, a counter-clockwise (from outside) triangle has a
    # negative screen area; that is the one whose normal faces the camera.
    verts_cam, faces, K = sphere_in_front(32)
    screen = project_screen(verts_cam, K)
    normals = torch.cross(verts_cam[0, faces[:, 1]] - verts_cam[0, faces[:, 0]],
                          verts_cam[0, faces[:, 2]] - verts_cam[0, faces[:, 0]], dim=-1)
    centres = verts_cam[0, faces].mean(1)
    facing = (normals * centres).sum(-1) < 0
    culled = rasterize(screen, faces, 32, cull_backfaces=True)
    full = rasterize(screen, faces, 32)
    visible = culled.face_idx[culled.mask].unique()
    assert facing[visible].all()
    # on a closed convex mesh only front faces are visible anyway
    torch.testing.assert_close(culled.face_idx, full.face_idx)


def test_quad_of_two_triangles_has_no_gaps_or_double_coverage_effects():
    H, W = 20, 20
    quad = screen_triangle([[2.5, 3.5], [16.5, 3.5], [16.5, 14.5]])
    quad = torch.cat([quad, torch.tensor([[[2.5, 14.5, 1.0]]], dtype=quad.dtype)], dim=1)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    frags = rasterize(quad, faces, (H, W))
    expected = np.zeros((H, W), bool)
    expected[4:15, 3:17] = True
    np.testing.assert_array_equal(frags.mask[0].numpy(), expected)


def test_zbuffer_keeps_the_nearer_triangle_whatever_the_face_order():
    big = [[1.2, 1.3], [30.7, 1.1], [15.4, 28.8]]
    small = [[8.2, 5.3], [22.7, 6.1], [15.1, 18.6]]
    near = screen_triangle(small, z=(1.0, 1.0, 1.0))
    far = screen_triangle(big, z=(2.0, 2.0, 2.0))
    verts = torch.cat([far, near], dim=1)
    for faces in (torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[3, 4, 5], [0, 1, 2]])):
        frags = rasterize(verts, faces, (32, 32))
        near_face = int((faces[:, 0] == 3).nonzero())
        inside_small = torch.from_numpy(
            points_in_poly(pixel_centres(32, 32), np.array(small)).reshape(32, 32))
        assert (frags.face_idx[0][inside_small] == near_face).all()
        torch.testing.assert_close(frags.zbuf[0][inside_small],
                                   torch.ones_like(frags.zbuf[0][inside_small]))
        rest = frags.mask[0] & ~inside_small
        torch.testing.assert_close(frags.zbuf[0][rest], torch.full_like(frags.zbuf[0][rest], 2.0))
        assert (frags.zbuf[0][~frags.mask[0]] == -1).all()


def test_zbuffer_of_intersecting_tilted_planes_matches_ray_plane_depth():
    # Two camera-space quads that cross each other: the visible depth at every
    # pixel must be the smaller ray-plane intersection depth.
    H = W = 40
    K = torch.tensor([[40.0, 0, 19.5], [0, 40.0, 19.5], [0, 0, 1]], dtype=torch.float64)
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64)

    def plane(z_of_xy):
        xy = corners * 0.6
        return torch.cat([xy, z_of_xy(xy)[:, None]], 1)

    a = plane(lambda xy: 1.0 + 0.4 * xy[:, 0])
    b = plane(lambda xy: 1.0 - 0.3 * xy[:, 0] + 0.2 * xy[:, 1])
    verts_cam = torch.cat([a, b])[None]
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    frags = rasterize(project_screen(verts_cam, K), faces, (H, W))

    def ray_depth(p0, p1, p2, u, v):
        # the ray through pixel (u, v) is z * ((u-cx)/fx, (v-cy)/fy, 1)
        d = np.stack([(u - 19.5) / 40.0, (v - 19.5) / 40.0, np.ones_like(u)], -1)
        n = np.cross(p1 - p0, p2 - p0)
        return (n @ p0) / (d @ n)

    uv = pixel_centres(H, W)
    pa, pb = a.numpy(), b.numpy()
    za = ray_depth(pa[0], pa[1], pa[2], uv[:, 0], uv[:, 1])
    zb = ray_depth(pb[0], pb[1], pb[2], uv[:, 0], uv[:, 1])
    mask = frags.mask[0].numpy().ravel()
    assert mask.mean() > 0.5
    expected = np.minimum(za, zb)[mask]
    np.testing.assert_allclose(frags.zbuf[0].numpy().ravel()[mask], expected, rtol=1e-9)
    chose_a = frags.face_idx[0].numpy().ravel()[mask] < 2
    assert chose_a.any() and (~chose_a).any()
    np.testing.assert_array_equal(chose_a, (za <= zb)[mask])


def test_barycentrics_sum_to_one_and_interpolate_the_surface_point_of_each_pixel():
    verts_cam, faces, K = sphere_in_front(48)
    frags = rasterize(project_screen(verts_cam, K), faces, 48)
    bary = frags.bary[frags.mask]
    torch.testing.assert_close(bary.sum(-1), torch.ones_like(bary[:, 0]))
    assert (bary >= -1e-9).all()
    # perspective-correct: the interpolated camera point projects to the pixel centre
    points = interpolate(frags, verts_cam, faces)[frags.mask]
    uv = project_screen(points[None], K)[0, :, :2]
    ys, xs = torch.nonzero(frags.mask[0], as_tuple=True)
    torch.testing.assert_close(uv, torch.stack([xs, ys], -1).to(uv.dtype))
    torch.testing.assert_close(points[:, 2], frags.zbuf[frags.mask])


def test_gradients_of_interpolated_image_agree_with_finite_differences():
    verts_cam, faces, K = sphere_in_front(20, subdivisions=1)
    colors = torch.rand(1, verts_cam.shape[1], 3, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))

    def image(v):
        frags = rasterize(project_screen(v, K), faces, 20)
        return interpolate(frags, colors, faces)

    leaf = verts_cam.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(image, (leaf,), eps=1e-7, atol=1e-6, rtol=1e-4)
    # and the gradient is not trivially zero
    image(leaf).sum().backward()
    assert leaf.grad.abs().sum() > 0


def test_antialiased_silhouette_gradients_agree_with_finite_differences():
    faces = torch.tensor([[0, 1, 2]])
    color = torch.tensor([0.2, 0.9], dtype=torch.float64)

    def image(verts):
        frags = rasterize(verts, faces, (16, 18))
        rgb = torch.where(frags.mask[..., None], color[1], color[0]).expand(-1, -1, -1, 1)
        rgb = rgb + frags.bary[..., :1] * 0.3  # smooth shading inside as well
        return antialias(rgb, frags, verts, faces)

    verts = screen_triangle([[2.31, 1.77], [15.62, 4.43], [6.18, 13.39]]).requires_grad_(True)
    assert torch.autograd.gradcheck(image, (verts,), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_antialiased_coverage_and_its_gradient_follow_the_triangle_area():
    faces = torch.tensor([[0, 1, 2]])
    verts = screen_triangle([[5.37, 4.21], [52.83, 11.64], [19.12, 49.58]]).requires_grad_(True)
    frags = rasterize(verts, faces, (64, 64))
    coverage = antialias(frags.mask[..., None].double(), frags, verts, faces).sum()
    coverage.backward()
    p = verts.detach()[0, :, :2]
    # shoelace area and its exact derivative w.r.t. each vertex
    area = 0.5 * abs(float((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1])
                           - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0])))
    coverage = coverage.detach()
    assert abs(float(coverage) - area) < 0.01 * area
    hard = float(frags.mask.sum())
    assert abs(float(coverage) - area) < abs(hard - area) + 1e-9
    sign = 1.0 if ((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1])
                   - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0])) > 0 else -1.0
    d_area = torch.zeros(3, 2, dtype=torch.float64)
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        d_area[i, 0] = 0.5 * sign * (p[j, 1] - p[k, 1])
        d_area[i, 1] = 0.5 * sign * (p[k, 0] - p[j, 0])
    grad = verts.grad[0, :, :2]
    assert torch.allclose(grad, d_area, atol=0.15 * d_area.abs().max())
    assert verts.grad[0, :, 2].abs().max() < 1e-12


def test_project_matches_the_intrinsic_matrix_and_focal_principal_point_forms():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(2, 7, 3)) * 0.1 + [0, 0, 0.6]
    K = np.array([[[500.0, 0, 100.0], [0, 520.0, 90.0], [0, 0, 1]],
                  [[300.0, 0, 60.0], [0, 310.0, 70.0], [0, 0, 1]]])
    homogeneous = np.einsum("bij,bvj->bvi", K, pts)
    expected = homogeneous[..., :2] / homogeneous[..., 2:]
    out = project_screen(torch.from_numpy(pts), torch.from_numpy(K)).numpy()
    np.testing.assert_allclose(out[..., :2], expected)
    np.testing.assert_allclose(out[..., 2], pts[..., 2])
    out2 = project_screen(torch.from_numpy(pts), focal=torch.tensor([[500.0, 520.0], [300.0, 310.0]],
                                                              dtype=torch.float64),
                   principal_point=torch.tensor([[100.0, 90.0], [60.0, 70.0]],
                                                dtype=torch.float64)).numpy()
    np.testing.assert_allclose(out2, out)


def test_face_adjacency_of_a_closed_mesh_is_symmetric_and_complete():
    _, faces = icosphere(1)
    adjacency = face_adjacency(torch.from_numpy(faces)).numpy()
    assert (adjacency >= 0).all()
    for f in range(len(faces)):
        for i in range(3):
            g = adjacency[f, i]
            shared = set(faces[f]) - {faces[f][i]}
            assert shared <= set(faces[g]) and g != f
    open_faces = torch.from_numpy(faces[1:])
    assert (face_adjacency(open_faces) == -1).sum() == 3


def test_vertex_normals_of_a_sphere_point_outwards():
    verts, faces = icosphere(2)
    normals = vertex_normals(torch.from_numpy(verts)[None] * 0.1 + 0.5, torch.from_numpy(faces))
    cosine = (normals[0] * torch.from_numpy(verts)).sum(-1)
    assert cosine.min() > 0.99


def test_sh_shading_uses_decas_basis_in_a_y_up_z_to_viewer_frame():
    normals_cam = torch.nn.functional.normalize(torch.randn(1, 50, 3, dtype=torch.float64), dim=-1)
    coeffs = torch.randn(1, 9, 3, dtype=torch.float64)
    shading = sh_shading(normals_cam, coeffs)
    x, y, z = normals_cam[0, :, 0], -normals_cam[0, :, 1], -normals_cam[0, :, 2]
    basis = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x ** 2 - y ** 2,
                         3 * z ** 2 - 1], -1) * torch.tensor(DECA_SH_CONSTANTS)
    torch.testing.assert_close(shading[0], basis @ coeffs[0])
    # a positive 'z' band coefficient lights surfaces that face the camera
    only_z = torch.zeros(1, 9, 3, dtype=torch.float64)
    only_z[0, 3] = 1.0
    facing = sh_shading(torch.tensor([[[0.0, 0.0, -1.0]]], dtype=torch.float64), only_z)
    assert (facing > 0).all()


def test_render_shaded_sphere_has_the_projected_disc_and_upper_left_light():
    size = 64
    verts_cam, faces, K = sphere_in_front(size, subdivisions=3, dtype=torch.float32)
    rgb, mask = render_shaded(verts_cam, faces, K, size)
    assert rgb.shape == (1, size, size, 3) and mask.shape == (1, size, size)
    # the silhouette of a sphere of radius r at distance d has angular radius asin(r/d)
    radius_px = K[0, 0] * np.tan(np.arcsin(0.1 / 0.5))
    assert abs(float(mask.sum()) - np.pi * radius_px ** 2) < 0.03 * np.pi * radius_px ** 2
    grey = rgb[0].mean(-1)
    c = size // 2
    q = int(radius_px * 0.5)
    assert grey[c - q, c - q] > grey[c + q, c + q] + 0.1
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    colours = torch.tensor([1.0, 0.0, 0.0]).expand(verts_cam.shape[1], 3)
    red, _ = render_shaded(verts_cam, faces, K, size, colors=colours)
    inside = mask[0] > 0.99
    assert (red[0][inside][:, 1:] == 0).all() and (red[0][inside][:, 0] > 0).all()


def test_batched_rasterization_equals_one_at_a_time():
    verts_cam, faces, K = sphere_in_front(24)
    shifted = verts_cam + torch.tensor([0.03, -0.02, 0.1], dtype=verts_cam.dtype)
    batch = torch.cat([verts_cam, shifted])
    frags = rasterize(project_screen(batch, K), faces, (24, 30))
    for i in range(2):
        single = rasterize(project_screen(batch[i:i + 1], K), faces, (24, 30))
        torch.testing.assert_close(frags.face_idx[i], single.face_idx[0])
        torch.testing.assert_close(frags.bary[i], single.bary[0])
    assert not torch.equal(frags.face_idx[0], frags.face_idx[1])


def test_screen_linear_mode_interpolates_depth_linearly_in_pixels():
    tri_uv = [[2.2, 3.1], [27.8, 5.6], [9.4, 25.3]]
    z = (1.0, 3.0, 2.0)
    frags = rasterize(screen_triangle(tri_uv, z=z), torch.tensor([[0, 1, 2]]), (30, 30),
                      perspective_correct=False)
    # the plane z = a*u + b*v + c through the three screen vertices
    A = np.c_[np.array(tri_uv), np.ones(3)]
    a, b, c = np.linalg.solve(A, np.array(z))
    ys, xs = np.nonzero(frags.mask[0].numpy())
    np.testing.assert_allclose(frags.zbuf[0].numpy()[ys, xs], a * xs + b * ys + c, rtol=1e-12)
    bary = frags.bary[frags.mask]
    torch.testing.assert_close(bary.sum(-1), torch.ones_like(bary[:, 0]))


def test_sample_texture_puts_uv_v_up_at_the_texture_top_row():
    from lightning_ft.render import sample_texture
    quad = torch.tensor([[[-0.5, -0.5, 1.0], [16.5, -0.5, 1.0], [16.5, 16.5, 1.0],
                          [-0.5, 16.5, 1.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv_of_vertex = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]],
                                dtype=torch.float64)  # image top = uv v 1
    face_uvs = uv_of_vertex[faces]
    texture = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    texture[0, 0, 0] = 1.0   # top row red
    texture[0, 2, -1] = 1.0  # bottom row blue
    frags = rasterize(quad, faces, (16, 16))
    image = sample_texture(frags, face_uvs, texture)
    assert image[0, 0, 8, 0] > 0.9 and image[0, 0, 8, 2] < 0.1
    assert image[0, -1, 8, 2] > 0.9 and image[0, -1, 8, 0] < 0.1


def test_triangles_behind_the_camera_or_off_screen_are_dropped_without_errors():
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    behind = screen_triangle([[2.2, 3.1], [27.8, 5.6], [9.4, 25.3]], z=(1.0, -0.5, 2.0))
    off = screen_triangle([[-50.2, 3.1], [-27.8, 5.6], [-40.4, 25.3]])
    verts = torch.cat([behind, off], dim=1).requires_grad_(True)
    frags = rasterize(verts, faces, (30, 30))
    assert not frags.mask.any()
    image = antialias(interpolate(frags, verts, faces), frags, verts, faces)
    assert image.shape == (1, 30, 30, 3) and (image == 0).all()
    image.sum().backward()
    assert (verts.grad == 0).all()


def test_chunked_cpu_rasterization_equals_one_pass(monkeypatch):
    import lightning_ft.render as render
    verts_cam, faces, K = sphere_in_front(64, subdivisions=2)
    screen = project_screen(torch.cat([verts_cam, verts_cam + 0.02]), K)
    monkeypatch.setattr(render, "_CPU_CHUNK", 1 << 40)
    whole = rasterize(screen, faces, (64, 70))
    monkeypatch.setattr(render, "_CPU_CHUNK", 97)  # many runs, some single big triangles
    chunked = rasterize(screen, faces, (64, 70))
    assert whole.mask.float().mean() > 0.1
    torch.testing.assert_close(chunked.face_idx, whole.face_idx)
    torch.testing.assert_close(chunked.zbuf, whole.zbuf)


# ----------------------------------------------------------------------------
# The display path (DisplayRenderer): the same picture without autograd


def _backends():
    from lightning_ft import render_jit
    numba_param = pytest.param("numba", marks=pytest.mark.skipif(
        not render_jit.available(), reason="numba does not import here"))
    return [numba_param, "torch"]


def display_scene(H=120, W=160):
    """A rotated icosphere 'head' with a smaller sphere pushed half into it
    (intersecting surfaces) and, in front, an open bowl whose inside (back
    faces) faces the camera: visibility that a z-buffer must resolve per pixel."""
    from scipy.spatial.transform import Rotation

    head, head_faces = icosphere(3)
    bump, bump_faces = icosphere(2)
    bowl, bowl_faces = icosphere(2)
    R = Rotation.from_euler("xyz", [0.4, -0.6, 0.2]).as_matrix()
    keep = bowl[bowl_faces].mean(1)[:, 2] > -0.2  # a cap: open towards the camera
    parts = [(head @ R.T * 0.1 + [0.0, 0.0, 0.6], head_faces),
             (bump * 0.04 + [0.07, -0.03, 0.55], bump_faces),
             (bowl * 0.035 + [-0.06, 0.05, 0.45], bowl_faces[keep])]
    verts, faces, offset = [], [], 0
    for v, f in parts:
        verts.append(v)
        faces.append(f + offset)
        offset += len(v)
    focal = 2.0 * W
    K = torch.tensor([[focal, 0, (W - 1) / 2 + 3.3], [0, focal * 1.02, (H - 1) / 2 - 2.1], [0, 0, 1]])
    return (torch.tensor(np.concatenate(verts), dtype=torch.float32),
            torch.from_numpy(np.concatenate(faces)), K, (H, W))


def occlusion_edges(face_idx: torch.Tensor, faces: torch.Tensor) -> np.ndarray:
    """[H,W] bool: pixels within one pixel of a silhouette or occlusion edge,
    i.e. of a neighbour showing a face that is neither the same nor adjacent."""
    adjacency = face_adjacency(faces).numpy()
    f = face_idx.numpy()
    H, W = f.shape
    edge = np.zeros((H, W), bool)
    for axis in (0, 1):
        a = f.take(range(f.shape[axis] - 1), axis=axis)
        b = f.take(range(1, f.shape[axis]), axis=axis)
        neighbours = (a == b) | ((a >= 0) & (b >= 0) & (adjacency[np.maximum(a, 0)] == b[..., None]).any(-1))
        cut = ~neighbours
        if axis == 0:
            edge[:-1] |= cut
            edge[1:] |= cut
        else:
            edge[:, :-1] |= cut
            edge[:, 1:] |= cut
    grown = edge.copy()  # and one more pixel around: antialias blends both sides
    grown[1:] |= edge[:-1]
    grown[:-1] |= edge[1:]
    grown[:, 1:] |= edge[:, :-1]
    grown[:, :-1] |= edge[:, 1:]
    return grown


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("appearance", ["grey", "colours", "sh", "texture"])
def test_display_renderer_draws_the_picture_of_render_shaded(backend, appearance):
    from lightning_ft.render import DisplayRenderer

    verts, faces, K, size = display_scene()
    rng = np.random.default_rng(3)
    kwargs = {}
    if appearance == "colours":
        kwargs["colors"] = torch.from_numpy(rng.uniform(0.2, 1.0, (len(verts), 3)).astype(np.float32))
    if appearance == "sh":
        sh = np.zeros((9, 3), np.float32)
        sh[0] = 2.0
        sh[1:4] = rng.normal(0, 0.4, (3, 3))
        sh[4:] = rng.normal(0, 0.15, (5, 3))
        kwargs["sh_coeffs"] = torch.from_numpy(sh)[None]
    if appearance == "texture":
        kwargs["face_uvs"] = torch.from_numpy(rng.uniform(0, 1, (len(faces), 3, 2)).astype(np.float32))
        kwargs["texture"] = torch.from_numpy(rng.uniform(0, 1, (1, 3, 16, 24)).astype(np.float32))
    reference_rgb, reference_mask = render_shaded(verts[None], faces, K, size, **kwargs)
    reference_faces = rasterize(project_screen(verts[None], K), faces, size).face_idx[0]
    renderer = DisplayRenderer(faces, size, backend=backend)
    assert renderer.backend == backend
    display_kwargs = dict(kwargs)
    if "colors" in kwargs:
        display_kwargs["colors"] = kwargs["colors"]
    if "sh_coeffs" in kwargs:
        display_kwargs["sh_coeffs"] = kwargs["sh_coeffs"][0]
    image, mask = renderer.render_image(verts, K, background=(7, 8, 9), **display_kwargs)
    frags = renderer.rasterize(project_screen(verts[None], K)[0])

    # the same triangle at (nearly) every pixel; the rest on exact edges
    same_face = frags.face_idx() == reference_faces
    assert (reference_faces >= 0).float().mean() > 0.3
    assert (reference_faces[1:] != reference_faces[:-1]).any()
    assert same_face.float().mean() >= 0.999
    assert not ((mask != (reference_faces >= 0).numpy()) & same_face.numpy()).any()
    # the same colour, within rounding, at >= 99% of the pixels, and
    # differences beyond rounding only where render_shaded blends edges
    expected = np.where(reference_mask[0, ..., None].numpy() > 0, np.round(reference_rgb[0].numpy() * 255),
                        [7, 8, 9])
    off = np.abs(image.astype(float) - expected).max(-1) > 1
    assert off.mean() < 0.01, off.mean()
    edges = occlusion_edges(reference_faces, faces)
    assert edges.mean() < 0.3  # the exemption is a minority of the picture
    assert not (off & ~edges).any(), np.argwhere(off & ~edges)[:5]


@pytest.mark.parametrize("backend", _backends())
def test_display_rasterizer_leaves_no_gap_between_triangles_sharing_an_edge(backend):
    """A jittered grid whose vertices include exact pixel centres and
    half-pixel points: every pixel centre inside the outline is covered."""
    from lightning_ft.render import DisplayRenderer

    rng = np.random.default_rng(0)
    n = 13
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float64)
    uv = np.stack([gx * 4.0 + 2, gy * 3.0 + 2], -1)
    inner = (slice(1, -1), slice(1, -1))
    jitter = rng.choice([0.0, 0.5, 1.0, -0.5, 0.37], size=uv[inner].shape)
    uv[inner] += jitter
    quads = np.array([[i * n + j, i * n + j + 1, (i + 1) * n + j + 1, (i + 1) * n + j]
                      for i in range(n - 1) for j in range(n - 1)])
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    screen = torch.from_numpy(np.c_[uv.reshape(-1, 2), 1.0 + 0.01 * rng.random(n * n)]).float()
    renderer = DisplayRenderer(faces, (42, 54), backend=backend)
    covered = renderer.rasterize(screen).face_idx() >= 0
    expected = np.zeros((42, 54), bool)
    expected[2:39, 2:51] = True  # the grid's straight outer border runs through pixel centres
    np.testing.assert_array_equal(covered.numpy(), expected)


def test_display_renderer_uses_pytorch_where_numba_does_not_import(monkeypatch):
    import sys

    from lightning_ft import render_jit
    from lightning_ft.render import DisplayRenderer

    render_jit.available.cache_clear()
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    try:
        verts, faces, K, size = display_scene(40, 50)
        renderer = DisplayRenderer(faces, size)
        assert renderer.backend == "torch"
        image, mask = renderer.render_image(verts, K)
        assert mask.mean() > 0.2 and image[mask].mean() > 40
        with pytest.raises(LightningFTError, match="numba"):
            DisplayRenderer(faces, size, backend="numba")
    finally:
        render_jit.available.cache_clear()


def test_display_renderer_draws_with_pytorch_when_the_compiled_kernels_fail(monkeypatch, caplog):
    from lightning_ft import render_jit
    from lightning_ft.render import DisplayRenderer

    if not render_jit.available():
        pytest.skip("numba does not import here")
    verts, faces, K, size = display_scene(40, 50)
    expected, expected_mask = DisplayRenderer(faces, size, backend="torch").render_image(verts, K)
    renderer = DisplayRenderer(faces, size, backend="numba")

    def broken(name):
        raise RuntimeError(f"no LLVM for {name}")

    monkeypatch.setattr(render_jit, "kernel", broken)
    image, mask = renderer.render_image(verts, K)
    assert renderer.backend == "torch" and "PyTorch" in caplog.text
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(mask, expected_mask)
