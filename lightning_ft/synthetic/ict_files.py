"""A tiny synthetic ICT-FaceKit checkout for testing tools/convert_ict.py.

It has the real checkout's file layout (FaceXModel/generic_neutral_mesh.obj,
identityNNN.obj, one OBJ per expression named in vertex_indices.json, OBJ
text as ICT writes it: centimetres, `v`/`vt` lines, `usemtl` groups, quads and
triangles as `f v/vt ...`) and the real geometry order (face, head and neck,
mouth socket, ..., eyelashes), each geometry a handful of vertices: an
ellipsoidal face with a 68-point layout, spherical scleras and irises, small
patches for the rest. Identity and expression meshes are the neutral mesh
plus smooth random fields; expressions leave the eyeballs alone (as ICT's do),
identities move and scale each eyeball rigidly. Because the geometry counts
differ from ICT Light's, the converter reads them from the layout file written
here (`--layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..ict import ICT_LIGHT_LAYOUT

EXPRESSIONS = ("browInnerUp_L", "eyeBlink_L", "jawOpen", "mouthSmile_L", "mouthSmile_R")
SCLERA_RINGS, IRIS_RINGS, RING_POINTS = 5, 3, 8


@dataclass
class SyntheticICT:
    """checkout: folder holding FaceXModel/; layout: the --layout JSON.
    neutral_cm [N,3], identities_cm [K,N,3], expressions_cm {name: [N,3]}:
    the values as written to the OBJ files. geometry: name -> (first vertex,
    vertex count, first polygon, polygon count); kept: names the converter keeps."""

    checkout: Path
    layout: Path
    neutral_cm: np.ndarray
    identities_cm: np.ndarray
    expressions_cm: Dict[str, np.ndarray]
    lmk68: np.ndarray
    geometry: Dict[str, Tuple[int, int, int, int]] = field(default_factory=dict)
    kept: Tuple[str, ...] = ()


def _grid(nu: int, nv: int, point, wrap_u: bool = False):
    """Vertices of point(u, v) on a nu x nv grid (u, v in [0, 1]) and its quads,
    counter-clockwise when u runs along +x and v along +y seen from outside."""
    us = np.arange(nu) / (nu if wrap_u else nu - 1)
    vs = np.linspace(0, 1, nv)
    verts = np.array([point(u, v) for v in vs for u in us])
    quads = []
    for j in range(nv - 1):
        for i in range(nu if wrap_u else nu - 1):
            i1 = (i + 1) % nu
            quads.append([j * nu + i, j * nu + i1, (j + 1) * nu + i1, (j + 1) * nu + i])
    return verts, quads


def _face():
    """Front of an ellipsoid (cm), 14 x 14, one quad split into two triangles."""
    def point(u, v):
        az, el = np.deg2rad(-95 + 190 * u), np.deg2rad(-70 + 130 * v)
        return [7.5 * np.sin(az) * np.cos(el), 2.0 + 10.0 * np.sin(el), 9.0 * np.cos(az) * np.cos(el)]

    verts, polys = _grid(14, 14, point)
    a, b, c, d = polys.pop(0)
    return verts, [[a, b, c], [a, c, d]] + polys


def _eyeball(centre, radius: float):
    """Sclera (rings behind the cornea) then iris (front cap), about +z."""
    def ring_point(theta_deg):
        def point(u, v):
            th, ph = np.deg2rad(theta_deg[0] + (theta_deg[1] - theta_deg[0]) * v), 2 * np.pi * u
            return centre + radius * np.array([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)])
        return point

    # Rings run from the back to the front so the grid's winding faces outwards.
    sclera, sq = _grid(RING_POINTS, SCLERA_RINGS, ring_point((170, 60)), wrap_u=True)
    iris, iq = _grid(RING_POINTS, IRIS_RINGS, ring_point((50, 10)), wrap_u=True)
    return (sclera, sq), (iris, iq)


def _patch(origin, size=1.0, n=3):
    return _grid(n, n, lambda u, v: np.asarray(origin) + size * np.array([u - 0.5, v - 0.5, 0.0]))


def _landmarks(face: np.ndarray) -> np.ndarray:
    """68 face vertices: a U-shaped jaw (0..16) and inner points (17..67)."""
    def nearest(x, y):
        front = face[:, 2] > 0
        d = (face[:, 0] - x) ** 2 + (face[:, 1] - y) ** 2 + np.where(front, 0, 1e6)
        return int(np.argmin(d))

    jaw = [nearest(6.5 * np.sin(a), 2.0 - 7.0 * np.cos(a)) for a in np.linspace(-1.37, 1.37, 17)]
    rng = np.random.default_rng(68)
    inner = [nearest(x, y) for x, y in zip(rng.uniform(-4, 4, 51), rng.uniform(-3, 7, 51))]
    return np.array(jaw + inner)


def _smooth_field(points: np.ndarray, rng: np.random.Generator, amplitude_cm: float) -> np.ndarray:
    k = rng.normal(size=(3, 3)) * 0.3
    phase = rng.uniform(0, 2 * np.pi, size=3)
    return amplitude_cm * np.sin(points @ k + phase)


def _obj_text(verts, uv, polys, groups) -> str:
    lines = ["# synthetic ICT-FaceKit-layout mesh (LightningFT tests)", "mtllib ICTFaceModelMaterial.mtl"]
    lines += [f"v {x:.6g} {y:.6g} {z:.6g}" for x, y, z in verts]
    lines += [f"vt {u:.6g} {v:.6g}" for u, v in uv]
    group_at = dict(groups)
    for p, poly in enumerate(polys):
        if p in group_at:
            lines.append(f"usemtl M_{group_at[p]}")
        lines.append("f " + " ".join(f"{i + 1}/{i + 1}" for i in poly))
    return "\n".join(lines) + "\n"


def _as_written(a: np.ndarray) -> np.ndarray:
    return np.array([[float(f"{x:.6g}") for x in row] for row in a])


def write_synthetic_ict(root: Path, n_identities: int = 3, seed: int = 0) -> SyntheticICT:
    """Write the checkout under root; returns what was written."""
    rng = np.random.default_rng(seed)
    parts: List[Tuple[str, np.ndarray, list]] = []
    face_v, face_p = _face()
    for g in ICT_LIGHT_LAYOUT:
        if g.name == "face":
            parts.append((g.name, face_v, face_p))
        elif g.name.startswith("eyeball_"):
            side = 1.0 if g.name.endswith("left") else -1.0
            (sv, sq), (iv, iq) = _eyeball(np.array([3.1 * side, 3.6, 6.0]), 1.2)
            parts.append((g.name, np.concatenate([sv, iv]), sq + [[i + len(sv) for i in q] for q in iq]))
        else:
            origin = rng.uniform([-3, -4, 0], [3, 4, 4])
            parts.append((g.name, *_patch(origin)))
    verts, polys, groups, geometry = [], [], [], {}
    for name, v, p in parts:
        geometry[name] = (len(verts), len(v), len(polys), len(p))
        groups.append((len(polys), name))
        polys += [[i + len(verts) for i in q] for q in p]
        verts += list(v)
    neutral = _as_written(np.asarray(verts))
    uv = np.stack([(neutral[:, 0] + 10) / 20, (neutral[:, 1] + 10) / 20], axis=1)

    identities = []
    for _ in range(n_identities):
        d = _smooth_field(neutral, rng, 0.4)
        for eye in ("eyeball_left", "eyeball_right"):
            a, n = geometry[eye][:2]
            ball = neutral[a:a + n]
            c = ball.mean(0)
            d[a:a + n] = (ball - c) * rng.uniform(-0.05, 0.05) + rng.normal(size=3) * 0.1
        identities.append(_as_written(neutral + d))
    expressions = {}
    face_like = np.zeros(len(neutral), dtype=bool)
    for name in ("face", "mouth_socket", "gums_tongue", "teeth", "eyelashes_left", "eyelashes_right"):
        a, n = geometry[name][:2]
        face_like[a:a + n] = True
    for name in EXPRESSIONS:
        d = _smooth_field(neutral, rng, 1.5) * face_like[:, None]
        expressions[name] = _as_written(neutral + d)

    model_dir = Path(root) / "FaceXModel"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "generic_neutral_mesh.obj").write_text(_obj_text(neutral, uv, polys, groups))
    for k, ident in enumerate(identities):
        (model_dir / f"identity{k:03d}.obj").write_text(_obj_text(ident, uv, polys, groups))
    for name, e in expressions.items():
        (model_dir / f"{name}.obj").write_text(_obj_text(e, uv, polys, groups))
    lmk68 = _landmarks(face_v)
    (model_dir / "vertex_indices.json").write_text(json.dumps({
        "expressions": list(EXPRESSIONS), "fitting_expressions": list(EXPRESSIONS),
        "idx_to_landmark_verts": [int(i) for i in lmk68]}))
    layout = Path(root) / "layout.json"
    kept = tuple(g.name for g in ICT_LIGHT_LAYOUT if g.kept)
    layout.write_text(json.dumps({
        "geometries": [[g.name, geometry[g.name][1], geometry[g.name][3], g.kept] for g in ICT_LIGHT_LAYOUT],
        "sclera_vertices": SCLERA_RINGS * RING_POINTS}))
    return SyntheticICT(checkout=Path(root), layout=layout, neutral_cm=neutral,
                        identities_cm=np.stack(identities), expressions_cm=expressions,
                        lmk68=lmk68, geometry=geometry, kept=kept)
