"""Build LightningFT's ICT model file from an ICT-FaceKit checkout.

    python tools/convert_ict.py ICT_CHECKOUT OUT_FILE [--mediapipe-embedding FILE]

ICT_CHECKOUT is a clone of github.com/ICT-VGL/ICT-FaceKit (FaceXModel/*.obj and
FaceXModel/vertex_indices.json are read). OUT_FILE (normally
lightning_ft/data/ict/ict_face_model_light.npz) is an .npz archive, written
byte-for-byte reproducibly, holding:

- v_template [V,3] float32, meters (OBJ centimetres / 100, not re-centred);
- shapedirs [100,V,3] and expdirs [53,V,3] float16, meters: `identityNNN.obj -
  generic_neutral_mesh.obj` and `<expression>.obj - generic_neutral_mesh.obj`.
  Deltas are rounded to a 2**-17 m (7.6 um) grid before the float16 cast: for
  deltas under 15.6 mm float16's own spacing is that fine or finer, so the
  worst-case error stays float16's (3.8 um), while the zeroed low mantissa bits
  halve the compressed size (identity deltas: 11.5 -> 5.5 MB);
- faces [F,3] int32 (ICT's quads split along their first diagonal, winding
  kept: counter-clockwise seen from outside), face_polygon_ids [F] (the OBJ
  polygon each triangle comes from), faces_uv [F,3] / uv [T,2] (ICT's UVs);
- kept_vertex_ids [V]: model vertex k is OBJ vertex kept_vertex_ids[k];
  geometry_names / geometry_vertex_ranges [G,2] of the kept geometries (model
  indices); eyeball_vertex_ranges [2,3] (left, right: first vertex, first iris
  vertex, end);
- expression_names [53], lmk68_vertex_ids [68] (OBJ indices, from
  vertex_indices.json = the README's Multi-PIE list), lmk68_faces / lmk68_bary
  (the same points as face corners), dynamic_faces [79,17] / dynamic_bary
  [79,17,3] (the jaw contour per yaw row, see `jaw_contour_table`);
- with --mediapipe-embedding (a file from tools/build_ict_mediapipe_embedding.py):
  dense_faces [M], dense_bary [M,3], mediapipe_indices [M].

Geometries kept and dropped: lightning_ft.ict.ICT_LIGHT_LAYOUT (the README's
table). `--layout FILE` replaces that table (JSON: {"geometries": [[name,
n_vertices, n_polygons, kept], ...], "sclera_vertices": n}); the tests use it
for a tiny synthetic checkout of the same file layout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lightning_ft.ict import FORMAT_VERSION, ICT_LIGHT_LAYOUT, ICT_LIGHT_SCLERA_VERTICES, Geometry  # noqa: E402

DELTA_GRID_M = 2.0 ** -17
# FLAME's contour table layout (lightning_ft.flame.contour_rows): rows 0..39 hold
# yaw 0..39 degrees, rows 40..78 yaw -1..-39.
CONTOUR_YAWS_DEG = np.concatenate([np.arange(0, 40), -np.arange(1, 40)]).astype(np.float64)


class ConversionError(Exception):
    pass


# ----------------------------------------------------------------------------
# OBJ reading


def read_obj_vertices(path: Path) -> np.ndarray:
    """`v` lines of an OBJ file, [N,3] float64 (file units)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror})") from None
    rows = [line[2:] for line in data.split(b"\n") if line.startswith(b"v ")]
    try:
        v = np.array(b" ".join(rows).split(), dtype=np.float64)
    except ValueError:
        raise ConversionError(f"{path}: malformed vertex line") from None
    if v.size != 3 * len(rows):
        raise ConversionError(f"{path}: vertex lines must hold exactly x y z")
    return v.reshape(-1, 3)


def read_obj_polygons(path: Path) -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]:
    """UVs [T,2] and, per polygon, its vertex and UV indices (0-based)."""
    uv, polys, polys_uv = [], [], []
    for line in path.read_text().splitlines():
        if line.startswith("vt "):
            uv.append([float(x) for x in line.split()[1:3]])
        elif line.startswith("f "):
            corners = [c.split("/") for c in line.split()[1:]]
            polys.append(np.array([int(c[0]) - 1 for c in corners]))
            polys_uv.append(np.array([int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners]))
    return np.asarray(uv, dtype=np.float64).reshape(-1, 2), polys, polys_uv


# ----------------------------------------------------------------------------
# Geometry helpers


def vertex_normals(v: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V,3]."""
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def vertices_as_face_points(vertex_ids: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each vertex as a barycentric point: (the lowest face holding it, one-hot bary)."""
    vertex_ids = np.asarray(vertex_ids)
    flat = vertex_ids.reshape(-1)
    first_face = np.full(int(faces.max()) + 1, -1, dtype=np.int64)
    first_corner = np.zeros_like(first_face)
    order = np.arange(faces.shape[0])[:, None].repeat(3, 1)
    corners = np.arange(3)[None].repeat(faces.shape[0], 0)
    key = faces.reshape(-1)
    # Stable: sort by (vertex, face, corner) and keep the first entry per vertex.
    idx = np.lexsort((corners.reshape(-1), order.reshape(-1), key))
    keys_sorted = key[idx]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = keys_sorted[1:] != keys_sorted[:-1]
    first_face[keys_sorted[first]] = order.reshape(-1)[idx[first]]
    first_corner[keys_sorted[first]] = corners.reshape(-1)[idx[first]]
    if (first_face[flat] < 0).any():
        raise ConversionError("a landmark vertex belongs to no kept triangle")
    bary = np.zeros((flat.size, 3))
    bary[np.arange(flat.size), first_corner[flat]] = 1.0
    return first_face[flat].reshape(vertex_ids.shape), bary.reshape(vertex_ids.shape + (3,))


def inside_outline(xy: np.ndarray, outline: np.ndarray, margin: float) -> np.ndarray:
    """[N] bool: points xy [N,2] inside the closed polygon outline [K,2] (even-odd
    rule) or within `margin` of its edges."""
    a, b = outline, np.roll(outline, -1, axis=0)
    x, y = xy[:, None, 0], xy[:, None, 1]
    crosses = ((a[None, :, 1] > y) != (b[None, :, 1] > y)) & (
        x < a[None, :, 0] + (y - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0])
        / np.where(b[:, 1] == a[:, 1], 1e-30, b[:, 1] - a[:, 1])[None])
    inside = crosses.sum(1) % 2 == 1
    ab = b - a
    t = np.clip(((xy[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-30)[None], 0, 1)
    dist = np.linalg.norm(xy[:, None] - (a[None] + t[..., None] * ab[None]), axis=-1).min(1)
    return inside | (dist <= margin)


def jaw_contour_table(v: np.ndarray, faces: np.ndarray, jaw_ids: Sequence[int], candidates: np.ndarray,
                      yaws_deg: np.ndarray = CONTOUR_YAWS_DEG, margin: float = 0.005) -> np.ndarray:
    """Vertex ids [R,17] of the jaw outline seen at each yaw (degrees).

    Points on the side turning towards the camera, the chin point, and all
    points at yaw 0 stay at the README's jaw vertices; the points on the side
    turning away follow the occluding contour:

    Contour point i is searched on a "meridian" through the README's jaw
    vertex p_i: the slab of candidate vertices within half the spacing of the
    jaw points of the plane through p_i whose normal is the jaw line's tangent
    in the frontal (x, y) view -- a horizontal slice on the cheeks, a sagittal
    one at the chin. The head turned by yaw about +y (FLAME's convention,
    camera looking along -z) shows the slice's occluding contour: among its
    vertices still facing the camera (rotated normal z > 0), the one farthest
    along the jaw's outward 2-D normal o_i in the image plane, which on the
    cheeks is the largest horizontal extent. Candidates are the face vertices
    whose frontal projection lies within `margin` of the README's jaw outline
    (closed upwards), which keeps the ears and the neck out, and at most 4 cm
    inward of p_i so that a cheek slice cannot reach the nose.
    """
    jaw = v[np.asarray(jaw_ids)]
    n = vertex_normals(v, faces)
    top = v[:, 1].max() + 0.01
    outline = np.concatenate([jaw[:, :2], [[jaw[-1, 0], top], [jaw[0, 0], top]]])
    cand = np.flatnonzero(candidates)
    cand = cand[inside_outline(v[cand, :2], outline, margin)]
    centre_xy = jaw[:, :2].mean(0)
    out = np.zeros((len(yaws_deg), len(jaw_ids)), dtype=np.int64)
    for i in range(len(jaw_ids)):
        a, b = jaw[max(i - 1, 0)], jaw[min(i + 1, len(jaw) - 1)]
        t = np.array([b[0] - a[0], b[1] - a[1], 0.0])
        t /= np.linalg.norm(t)
        o = np.array([t[1], -t[0], 0.0])
        if o[:2] @ (jaw[i, :2] - centre_xy) < 0:
            o = -o
        half = 0.5 * max(np.linalg.norm(jaw[min(i + 1, len(jaw) - 1)] - jaw[i]),
                         np.linalg.norm(jaw[max(i - 1, 0)] - jaw[i]))
        d = v[cand] - jaw[i]
        slab = cand[(np.abs(d @ t) <= max(half, 1e-3)) & (d @ o >= -0.04)]
        if slab.size == 0:
            raise ConversionError(f"jaw contour point {i}: no candidate vertices on its meridian")
        side = np.sign(round(jaw[i, 0], 4))  # -1: subject's right, +1: left, 0: chin
        for r, yaw in enumerate(np.deg2rad(yaws_deg)):
            if side * yaw <= 0:
                # Facing the camera (or frontal): the outline a 2-D detector draws
                # there is the jaw line itself, not the occluding contour, which
                # on this side runs back over the ear.
                out[r, i] = jaw_ids[i]
                continue
            c, s = np.cos(yaw), np.sin(yaw)
            R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
            facing = (n[slab] @ R.T)[:, 2] > 0
            pool = slab[facing] if facing.any() else slab
            reach = (v[pool] @ R.T)[:, :2] @ o[:2]
            out[r, i] = pool[np.argmax(reach)]
    return out


# ----------------------------------------------------------------------------
# Deterministic .npz


def write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> str:
    """np.savez_compressed's format with fixed member order and timestamps, so a
    rebuild from the same inputs gives the same bytes (and sha256). Written to
    a temporary name and renamed: never half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quantize_deltas(d_m: np.ndarray) -> np.ndarray:
    return (np.round(d_m / DELTA_GRID_M) * DELTA_GRID_M).astype(np.float16)


# ----------------------------------------------------------------------------
# Conversion


def load_layout(path: Path | None) -> Tuple[Tuple[Geometry, ...], int]:
    if path is None:
        return ICT_LIGHT_LAYOUT, ICT_LIGHT_SCLERA_VERTICES
    d = json.loads(Path(path).read_text())
    return tuple(Geometry(str(g[0]), int(g[1]), int(g[2]), bool(g[3])) for g in d["geometries"]), int(d["sclera_vertices"])


def convert(checkout: Path, layout: Tuple[Geometry, ...] = ICT_LIGHT_LAYOUT,
            sclera_vertices: int = ICT_LIGHT_SCLERA_VERTICES,
            mediapipe_embedding: Path | None = None) -> Dict[str, np.ndarray]:
    """All arrays of the model file (see the module docstring)."""
    model_dir = Path(checkout) / "FaceXModel"
    index_file = model_dir / "vertex_indices.json"
    if not index_file.is_file():
        raise ConversionError(f"{index_file}: not found; is {checkout} an ICT-FaceKit checkout?")
    indices = json.loads(index_file.read_text())
    expression_names = list(indices["expressions"])
    lmk68_obj = np.asarray(indices["idx_to_landmark_verts"], dtype=np.int64)
    if lmk68_obj.shape != (68,):
        raise ConversionError(f"{index_file}: idx_to_landmark_verts must list 68 vertices")

    neutral_path = model_dir / "generic_neutral_mesh.obj"
    neutral = read_obj_vertices(neutral_path)
    uv, polys, polys_uv = read_obj_polygons(neutral_path)
    n_v, n_p = sum(g.n_vertices for g in layout), sum(g.n_polygons for g in layout)
    if neutral.shape[0] != n_v or len(polys) != n_p:
        raise ConversionError(f"{neutral_path}: {neutral.shape[0]} vertices and {len(polys)} polygons; "
                              f"the layout expects {n_v} and {n_p}")

    # Kept vertices and polygons, geometry by geometry in file order.
    kept_v, kept_p, geometry_ranges, geometry_names = [], [], [], []
    v0 = p0 = n_kept = 0
    for g in layout:
        if g.kept:
            kept_v.append(np.arange(v0, v0 + g.n_vertices))
            kept_p.extend(range(p0, p0 + g.n_polygons))
            geometry_names.append(g.name)
            geometry_ranges.append((n_kept, n_kept + g.n_vertices))
            n_kept += g.n_vertices
        v0 += g.n_vertices
        p0 += g.n_polygons
    kept_vertex_ids = np.concatenate(kept_v)
    new_index = np.full(n_v, -1, dtype=np.int64)
    new_index[kept_vertex_ids] = np.arange(kept_vertex_ids.size)

    tris, tris_uv, tri_poly = [], [], []
    for p in kept_p:
        corners, corners_uv = new_index[polys[p]], polys_uv[p]
        if (corners < 0).any():
            raise ConversionError(f"{neutral_path}: polygon {p} of a kept geometry uses a dropped vertex")
        for k in range(1, len(corners) - 1):  # fan: (a,b,c), (a,c,d)
            tris.append(corners[[0, k, k + 1]])
            tris_uv.append(corners_uv[[0, k, k + 1]])
            tri_poly.append(p)
    faces = np.asarray(tris, dtype=np.int64)
    faces_uv = np.asarray(tris_uv, dtype=np.int64)
    used_uv = np.unique(faces_uv)
    if used_uv.size and used_uv[0] < 0:
        raise ConversionError(f"{neutral_path}: a kept polygon has no texture coordinates")
    uv_index = np.full(uv.shape[0], -1, dtype=np.int64)
    uv_index[used_uv] = np.arange(used_uv.size)

    v_template = neutral[kept_vertex_ids] / 100.0

    identity_paths = []
    while (model_dir / f"identity{len(identity_paths):03d}.obj").is_file():
        identity_paths.append(model_dir / f"identity{len(identity_paths):03d}.obj")
    if not identity_paths:
        raise ConversionError(f"{model_dir}: no identity000.obj")

    def deltas(paths):
        out = np.empty((len(paths), kept_vertex_ids.size, 3), dtype=np.float16)
        for k, p in enumerate(paths):
            if not p.is_file():
                raise ConversionError(f"{p}: expression mesh listed in vertex_indices.json not found")
            v = read_obj_vertices(p)
            if v.shape != neutral.shape:
                raise ConversionError(f"{p}: {v.shape[0]} vertices, the neutral mesh has {neutral.shape[0]}")
            out[k] = quantize_deltas((v[kept_vertex_ids] - neutral[kept_vertex_ids]) / 100.0)
        return out

    shapedirs = deltas(identity_paths)
    expdirs = deltas([model_dir / f"{name}.obj" for name in expression_names])

    lmk68 = new_index[lmk68_obj]
    if (lmk68 < 0).any():
        raise ConversionError(f"{index_file}: a 68-point landmark lies on a dropped geometry")
    lmk68_faces, lmk68_bary = vertices_as_face_points(lmk68, faces)
    ranges = dict(zip(geometry_names, geometry_ranges))
    face_mask = np.zeros(kept_vertex_ids.size, dtype=bool)
    face_mask[slice(*ranges["face"])] = True
    contour = jaw_contour_table(v_template, faces, lmk68[:17], face_mask)
    dynamic_faces, dynamic_bary = vertices_as_face_points(contour, faces)
    eyeball_ranges = np.array([[ranges[e][0], ranges[e][0] + sclera_vertices, ranges[e][1]]
                               for e in ("eyeball_left", "eyeball_right")], dtype=np.int32)

    arrays = dict(
        format_version=np.array(FORMAT_VERSION, dtype=np.int32),
        v_template=v_template.astype(np.float32),
        shapedirs=shapedirs,
        expdirs=expdirs,
        faces=faces.astype(np.int32),
        face_polygon_ids=np.asarray(tri_poly, dtype=np.int32),
        faces_uv=uv_index[faces_uv].astype(np.int32),
        uv=uv[used_uv].astype(np.float32),
        kept_vertex_ids=kept_vertex_ids.astype(np.int32),
        geometry_names=np.array(geometry_names),
        geometry_vertex_ranges=np.array(geometry_ranges, dtype=np.int32),
        eyeball_vertex_ranges=eyeball_ranges,
        expression_names=np.array(expression_names),
        lmk68_vertex_ids=lmk68_obj.astype(np.int32),
        lmk68_faces=lmk68_faces.astype(np.int32),
        lmk68_bary=lmk68_bary.astype(np.float32),
        dynamic_faces=dynamic_faces.astype(np.int32),
        dynamic_bary=dynamic_bary.astype(np.float32),
        contour_yaw_deg=CONTOUR_YAWS_DEG.astype(np.int16),
    )
    if mediapipe_embedding is not None:
        with np.load(mediapipe_embedding) as emb:
            if int(emb["n_faces"]) != faces.shape[0] or int(emb["n_vertices"]) != kept_vertex_ids.size:
                raise ConversionError(f"{mediapipe_embedding}: built for another mesh "
                                      f"({int(emb['n_vertices'])} vertices, {int(emb['n_faces'])} faces)")
            arrays["dense_faces"] = emb["dense_faces"].astype(np.int32)
            arrays["dense_bary"] = emb["dense_bary"].astype(np.float32)
            arrays["mediapipe_indices"] = emb["mediapipe_indices"].astype(np.int32)
    return arrays


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path, help="ICT-FaceKit checkout (holds FaceXModel/)")
    ap.add_argument("out", type=Path, help="model file to write (.npz)")
    ap.add_argument("--mediapipe-embedding", type=Path, default=None,
                    help="embedding from tools/build_ict_mediapipe_embedding.py to include")
    ap.add_argument("--layout", type=Path, default=None, help="geometry table replacing ICT Light's (JSON)")
    args = ap.parse_args(argv)
    try:
        layout, sclera = load_layout(args.layout)
        arrays = convert(args.checkout, layout, sclera, args.mediapipe_embedding)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    digest = write_npz(args.out, arrays)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.2f} MB, {arrays['v_template'].shape[0]} vertices, "
          f"{arrays['faces'].shape[0]} triangles, {arrays['shapedirs'].shape[0]} identity and "
          f"{arrays['expdirs'].shape[0]} expression shapes")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
