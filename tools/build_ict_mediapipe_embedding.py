"""Embed mediapipe FaceMesh's 478 points on the ICT model's surface.

    python tools/build_ict_mediapipe_embedding.py [--model MODEL.npz] [--out FILE] [--save-views DIR]

Procedure (reproducible: fixed identities, views and colours; mediapipe
0.10.21's FaceMesh in static-image mode, refine_landmarks=True, via
lightning_ft.landmarks.MeshTracker):

1. Render the ICT model with LightningFT's own rasterizer (lightning_ft.render,
   Lambert light) as a painted, untextured head: skin, darker brows along the
   README's brow landmarks, reddish lips inside its outer lip landmarks,
   white scleras, brown irises with black pupils (the cornea bulge of ICT's
   sclera mesh is left out of the render so that the iris behind it shows).
   Identities: the neutral one and three drawn from N(0, 1) (seed 0); views:
   yaw -25, -12, 0, 12, 25 x pitch -10, 0, 10 degrees; 512 x 512 px, focal
   1000 px at 0.7 m: 60 images.
2. Run FaceMesh on each image; every detected point is cast back through the
   rasterizer's face buffer to (triangle, perspective-correct barycentric
   coordinates) and mapped to the same surface point of the neutral mesh.
   Iris points (468..477) are cast onto the eyeballs alone (a lid may cover
   the iris's edge; FaceMesh still puts the point on the iris circle).
3. Per mediapipe point, the robust centre of its per-view surface points
   (coordinate-wise median, then the mean of the views within 2.5 median
   absolute deviations), projected to the closest surface point: on the
   eyeballs for iris points, off them for all others (a lid point seen
   against the sclera goes to the lid). The iris centres fall into the pupil
   hole of ICT's iris mesh and are placed at the cornea apex instead.
4. Left out: mediapipe's 36 face-oval points (FACEMESH_FACE_OVAL): they are
   silhouette points that slide over the surface with the view (as the 68-point
   jaw contour does), so no fixed surface point represents them; and any point
   whose per-view spread (RMS distance to its centre) exceeds 5 mm.

Printed residuals: the 3-D spread (mm) of the per-view surface points around
the embedded point, and the reprojection error (px) of the embedded points
against mediapipe's detections in the 60 renders, per kept point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lightning_ft.ict import ICT  # noqa: E402
from lightning_ft.cameras import project_screen  # noqa: E402
from lightning_ft.render import rasterize, render_shaded  # noqa: E402

IMAGE_SIZE, FOCAL_PX, DISTANCE_M = 512, 1000.0, 0.7
YAWS, PITCHES = (-25, -12, 0, 12, 25), (-10, 0, 10)
N_RANDOM_IDENTITIES = 3
MAX_SPREAD_MM = 5.0
CORNEA_DEG, PUPIL_DEG, IRIS_DEG = 30.0, 9.0, 22.0


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    y, p = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    Ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return Ry @ Rx


def _inside(xy: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    a, b = polygon, np.roll(polygon, -1, axis=0)
    x, y = xy[:, None, 0], xy[:, None, 1]
    dy = np.where(b[:, 1] == a[:, 1], 1e-30, b[:, 1] - a[:, 1])
    crosses = ((a[:, 1] > y) != (b[:, 1] > y)) & (x < a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / dy)
    return crosses.sum(1) % 2 == 1


def paint(model: ICT):
    """Per-vertex colours [V,3] and the triangles to render (no cornea)."""
    v = model.v_template.double().numpy()
    faces = model.faces.numpy()
    colours = np.tile([0.80, 0.62, 0.52], (len(v), 1))
    lmk = v[model.faces[model.lmk68_faces].numpy()[np.arange(68), model.lmk68_bary.argmax(1).numpy()]]
    face = model.region_face.numpy()
    for brow in (lmk[17:22], lmk[22:27]):
        seg_a, seg_b = brow[:-1], brow[1:]
        d = v[:, None] - seg_a[None]
        ab = seg_b - seg_a
        t = np.clip((d * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
        dist = np.linalg.norm(d - t[..., None] * ab, axis=-1).min(1)
        colours[face & (dist < 0.004)] = [0.28, 0.20, 0.14]
    lips = face & _inside(v[:, :2], lmk[48:60, :2]) & (v[:, 2] > lmk[48:60, 2].min() - 0.01)
    colours[lips] = [0.72, 0.40, 0.40]
    r = model.geometry_vertex_ranges
    for name, rgb in (("mouth_socket", [0.30, 0.10, 0.10]), ("gums_tongue", [0.55, 0.25, 0.25]),
                      ("teeth", [0.92, 0.90, 0.84]), ("eye_socket_left", [0.55, 0.35, 0.35]),
                      ("eye_socket_right", [0.55, 0.35, 0.35])):
        colours[slice(*r[name])] = rgb
    hidden = np.zeros(len(v), dtype=bool)
    for e, ids in enumerate(model.eyeball_vertex_ids):
        c = model.eyeball_centres[e].double().numpy()
        first, first_iris, _ = model.eyeball_vertex_ranges[e]
        sclera = ids[:first_iris - first]
        # The cornea apex (the sclera vertex farthest from the centre) gives the eye's axis.
        apex = sclera[np.argmax(np.linalg.norm(v[sclera] - c, axis=1))]
        axis = (v[apex] - c) / np.linalg.norm(v[apex] - c)
        angle = np.degrees(np.arccos(np.clip(((v[ids] - c) / np.linalg.norm(v[ids] - c, axis=1)[:, None]) @ axis, -1, 1)))
        colours[ids] = [0.92, 0.92, 0.90]
        is_sclera = np.isin(ids, sclera)
        hidden[ids[is_sclera & (angle < CORNEA_DEG)]] = True
        iris = ~is_sclera
        colours[ids[iris & (angle < IRIS_DEG)]] = [0.35, 0.22, 0.12]
        colours[ids[iris & (angle < PUPIL_DEG)]] = [0.04, 0.04, 0.04]
    shown = ~hidden[faces].all(1)
    return colours, np.flatnonzero(shown)


def views(model: ICT):
    """(shape [100], rotation [3,3]) of every render."""
    rng = np.random.default_rng(0)
    shapes = [np.zeros(model.n_shape)] + [rng.normal(size=model.n_shape) for _ in range(N_RANDOM_IDENTITIES)]
    return [(s, _rotation(y, p)) for s in shapes for y in YAWS for p in PITCHES]


def camera_vertices(verts: np.ndarray, R: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Model space -> OpenCV camera (x right, y down, z forward), head at DISTANCE_M."""
    return ((verts - centre) @ R.T) * np.array([1.0, -1.0, -1.0]) + np.array([0.0, 0.0, DISTANCE_M])


def detect(model: ICT, save_views: Path | None = None, log=print):
    """Render every view, run FaceMesh, cast the points back to the surface.

    Returns detections [views,478,2] px (NaN where no face was found) and hits
    [H] records (point, view, triangle, bary [3]).
    """
    from lightning_ft.landmarks import MeshTracker

    colours, shown = paint(model)
    faces_all = model.faces
    faces = faces_all[torch.as_tensor(shown)]
    eyeball_faces = shown[model.region_eyeballs[faces].all(-1).numpy()]
    hits = []
    view_list = views(model)
    detections = np.full((len(view_list), 478, 2), np.nan)
    with MeshTracker(static=True) as tracker:
        for k, (shape, R) in enumerate(view_list):
            with torch.no_grad():
                verts = model(shape=torch.as_tensor(shape, dtype=torch.float32)[None])[0].double().numpy()
            cam = torch.as_tensor(camera_vertices(verts, R, _head_centre(model)))[None]
            rgb, mask = render_shaded(cam, faces, _intrinsics(), IMAGE_SIZE, colors=torch.as_tensor(colours))
            image = (rgb[0] + 0.45 * (1 - mask[0, ..., None])).clamp(0, 1)
            image = (image.numpy() * 255 + 0.5).astype(np.uint8)
            points = tracker(image)
            if save_views is not None:
                from PIL import Image

                save_views.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(save_views / f"view{k:02d}.png")
            if points is None:
                log(f"view {k}: no face found")
                continue
            detections[k] = points
            screen = project_screen(cam, _intrinsics())
            px = np.clip(np.round(points).astype(int), 0, IMAGE_SIZE - 1)
            raw = rasterize(screen, faces, IMAGE_SIZE).face_idx[0, px[:, 1], px[:, 0]].numpy()
            tri_ids = np.where(raw >= 0, shown[raw], -1)
            # Iris points are cast onto the eyeballs alone: where a lid covers the
            # iris's edge, FaceMesh still places the point on the iris circle.
            eye_hit = rasterize(screen, faces_all[torch.as_tensor(eyeball_faces)], IMAGE_SIZE).face_idx
            eye_hit = eye_hit[0, px[468:, 1], px[468:, 0]].numpy()
            tri_ids[468:] = np.where(eye_hit >= 0, eyeball_faces[eye_hit], -1)
            for i in np.flatnonzero(tri_ids >= 0):
                f = int(tri_ids[i])
                uvz = screen[0, faces_all[f]].numpy()
                b = _barycentric_2d(uvz[:, :2], points[i]) / uvz[:, 2]  # perspective-correct
                b = np.clip(b / b.sum(), 0, None)
                hits.append((i, k, f, b / b.sum()))
    return detections, hits


def _intrinsics() -> torch.Tensor:
    c = (IMAGE_SIZE - 1) / 2
    return torch.tensor([[FOCAL_PX, 0, c], [0, FOCAL_PX, c], [0, 0, 1.0]], dtype=torch.float64)


def _head_centre(model: ICT) -> np.ndarray:
    """The rotation centre of the views: the mean of the nose's 68 points (27..35)."""
    return model.landmarks68(model.v_template[None])[0, 27:36].double().numpy().mean(0)


def _cornea_apex(model: ICT, eye: int) -> int:
    first, first_iris, _ = model.eyeball_vertex_ranges[eye]
    v = model.v_template.double().numpy()
    c = model.eyeball_centres[eye].double().numpy()
    return int(first + np.argmax(np.linalg.norm(v[first:first_iris] - c, axis=1)))


def aggregate(model: ICT, detections: np.ndarray, hits, log=print):
    """The embedding from the per-view hits, and its residuals (see the module docstring)."""
    from mediapipe.python.solutions.face_mesh_connections import (FACEMESH_FACE_OVAL, FACEMESH_LEFT_IRIS,
                                                                 FACEMESH_RIGHT_IRIS)

    faces_all = model.faces.numpy()
    template = model.v_template.double().numpy()
    found = ~np.isnan(detections[:, 0, 0])
    on_eyeball = model.region_eyeballs[model.faces].all(-1).numpy()
    by_point = [[] for _ in range(478)]
    for i, k, f, b in hits:
        by_point[i].append((k, f, b))
    oval = {i for edge in FACEMESH_FACE_OVAL for i in edge}
    # Which eyeball each iris centre belongs to: where its four ring points were seen.
    eye_of_vertex = np.full(len(template), -1)
    for e, ids in enumerate(model.eyeball_vertex_ids):
        eye_of_vertex[ids] = e
    iris_centres = {}
    for centre, ring in ((468, {i for e in FACEMESH_RIGHT_IRIS for i in e}),
                         (473, {i for e in FACEMESH_LEFT_IRIS for i in e})):
        eyes = [eye_of_vertex[faces_all[f][0]] for i in ring for _, f, _ in by_point[i]]
        iris_centres[centre] = int(np.bincount([e for e in eyes if e >= 0], minlength=2).argmax())
    result = dict(dense_faces=[], dense_bary=[], mediapipe_indices=[], spread_mm=[])
    dropped = []
    for i in range(478):
        if i in oval or len(by_point[i]) < found.sum() // 2:
            continue
        pts = np.array([(template[faces_all[f]] * b[:, None]).sum(0) for _, f, b in by_point[i]])
        if i in iris_centres:
            # ICT's iris mesh has a 0.9 mm hole at the pupil, so the ray through
            # the iris centre hits the far side of the eyeball; the centre is
            # embedded at the cornea apex on the eye's axis instead.
            apex = _cornea_apex(model, iris_centres[i])
            f = int(np.flatnonzero((faces_all == apex).any(1))[0])
            b = (faces_all[f] == apex).astype(np.float64)
            p = template[apex]
        else:
            med = np.median(pts, axis=0)
            dev = np.linalg.norm(pts - med, axis=1)
            inliers = dev <= 2.5 * (np.median(dev) + 1e-6) / 0.6745 if len(pts) > 4 else np.ones(len(pts), bool)
            centre = pts[inliers].mean(0)
            # The closest surface point on the eyeballs for iris points, elsewhere
            # for all others (a lid point seen against the sclera goes to the lid).
            near = (np.linalg.norm(template[faces_all] - centre, axis=-1) < 0.006).any(1)
            cand = np.flatnonzero(near & (on_eyeball == (i >= 468)))
            f, b, p = _closest_on_triangles(template, faces_all, cand, centre)
        spread = 1000 * np.sqrt(np.mean(np.sum((pts - p) ** 2, axis=1)))
        if spread > MAX_SPREAD_MM and i not in iris_centres:
            dropped.append(i)
            continue
        result["dense_faces"].append(f)
        result["dense_bary"].append(b)
        result["mediapipe_indices"].append(i)
        result["spread_mm"].append(spread)
    out = {k: np.asarray(v) for k, v in result.items()}
    # Reprojection of the embedded points into every render, against mediapipe.
    errors = []
    with torch.no_grad():
        for k, (shape, R) in enumerate(views(model)):
            if not found[k]:
                continue
            verts = model(shape=torch.as_tensor(shape, dtype=torch.float32)[None])[0].double().numpy()
            pts = (verts[faces_all[out["dense_faces"]]] * out["dense_bary"][..., None]).sum(1)
            uv = project_screen(torch.as_tensor(camera_vertices(pts, R, _head_centre(model)))[None], _intrinsics())
            errors.append(np.linalg.norm(uv[0, :, :2].numpy() - detections[k][out["mediapipe_indices"]], axis=1))
    errors = np.stack(errors)  # [views, M]
    out["reprojection_px"] = errors.mean(0)
    iris = out["mediapipe_indices"] >= 468
    spread = out["spread_mm"][~np.isin(out["mediapipe_indices"], list(iris_centres))]
    log(f"FaceMesh found a face in {int(found.sum())} of {len(found)} renders; iris centres 468, 473 on "
        f"ICT eyeballs {iris_centres[468]}, {iris_centres[473]} (0 = left)")
    log(f"embedded {len(out['mediapipe_indices'])} of 478 points ({int(iris.sum())} iris points); left out "
        f"{len(oval)} face-oval points and {len(dropped)} whose views spread > {MAX_SPREAD_MM} mm: {dropped}")
    log(f"3-D spread of the per-view surface points around the embedded point (RMS, mm; iris centres "
        f"excluded): median {np.median(spread):.2f}, 90th percentile {np.percentile(spread, 90):.2f}, "
        f"max {spread.max():.2f}")
    log(f"reprojection against FaceMesh in the {int(found.sum())} renders (px at 512 px, face ~300 px tall): "
        f"median {np.median(errors):.2f}, mean {errors.mean():.2f}, 90th percentile "
        f"{np.percentile(errors, 90):.2f}; iris points median {np.median(errors[:, iris]):.2f}, "
        f"iris centres {np.median(errors[:, np.isin(out['mediapipe_indices'], list(iris_centres))]):.2f}")
    return out


def _barycentric_2d(tri: np.ndarray, p: np.ndarray) -> np.ndarray:
    a, b, c = tri
    m = np.array([[b[0] - a[0], c[0] - a[0]], [b[1] - a[1], c[1] - a[1]]])
    try:
        s, t = np.linalg.solve(m, p - a)
    except np.linalg.LinAlgError:
        return np.array([1.0, 0.0, 0.0])
    return np.array([1 - s - t, s, t])


def _closest_on_triangles(v: np.ndarray, faces: np.ndarray, cand: np.ndarray, p: np.ndarray):
    """Closest point to p on the candidate triangles: (triangle, bary [3], point)."""
    best = (np.inf, None, None, None)
    for f in cand:
        a, b, c = v[faces[f]]
        bary = _closest_bary(a, b, c, p)
        q = bary @ np.stack([a, b, c])
        d = np.linalg.norm(q - p)
        if d < best[0]:
            best = (d, int(f), bary, q)
    return best[1], best[2], best[3]


def _closest_bary(a, b, c, p):
    """Barycentric coordinates of the point of triangle abc closest to p (Ericson's method)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        return np.array([1.0, 0, 0])
    bp = p - b
    d3, d4 = ab @ bp, ac @ bp
    if d3 >= 0 and d4 <= d3:
        return np.array([0, 1.0, 0])
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        t = d1 / (d1 - d3)
        return np.array([1 - t, t, 0])
    cp = p - c
    d5, d6 = ab @ cp, ac @ cp
    if d6 >= 0 and d5 <= d6:
        return np.array([0, 0, 1.0])
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        t = d2 / (d2 - d6)
        return np.array([1 - t, 0, t])
    va = d3 * d6 - d5 * d4
    if va <= 0 and (d4 - d3) >= 0 and (d5 - d6) >= 0:
        t = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        return np.array([0, 1 - t, t])
    denom = 1.0 / (va + vb + vc)
    s, t = vb * denom, vc * denom
    return np.array([1 - s - t, s, t])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="ICT model file (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data" / "ict_mediapipe_embedding.npz")
    ap.add_argument("--save-views", type=Path, default=None, help="also write the renders as PNG here")
    ap.add_argument("--detections", type=Path, default=None,
                    help="cache of step 1-2 (renders and FaceMesh): read if it exists, else written")
    args = ap.parse_args(argv)
    model = ICT.load(args.model) if args.model else ICT.load()
    if args.detections is not None and args.detections.exists():
        with np.load(args.detections) as z:
            detections = z["detections"]
            hits = list(zip(z["point"], z["view"], z["triangle"], z["bary"]))
    else:
        detections, hits = detect(model, args.save_views)
        if args.detections is not None:
            np.savez(args.detections, detections=detections, point=np.array([h[0] for h in hits]),
                     view=np.array([h[1] for h in hits]), triangle=np.array([h[2] for h in hits]),
                     bary=np.array([h[3] for h in hits]))
    out = aggregate(model, detections, hits)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, n_faces=model.faces.shape[0], n_vertices=model.n_vertices,
             dense_faces=out["dense_faces"].astype(np.int32), dense_bary=out["dense_bary"].astype(np.float32),
             mediapipe_indices=out["mediapipe_indices"].astype(np.int32),
             spread_mm=out["spread_mm"].astype(np.float32), reprojection_px=out["reprojection_px"].astype(np.float32))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
