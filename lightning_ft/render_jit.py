"""Compiled (numba) kernels of the display renderer: `render.DisplayRenderer`'s CPU path.

The vectorised PyTorch display path in render.py spends most of its time
materialising per-pixel temporaries; these loops do the same arithmetic in one
pass per triangle and one per pixel (about 2 ms instead of 12 for the
visibility of a FLAME head at 512x512 on one core). numba comes with
face-alignment; where it does not import, `available()` is False and the
PyTorch path is used. Compiled code is cached on disk (`cache=True`), so only
the first run on a machine pays the compilation (a few seconds).

Conventions are render.py's: pixel i's centre at coordinate i, a pixel is
covered when its centre lies in the triangle (edges included), the nearest
surface wins by 1/z interpolated in screen space, ties to the lower face
index.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether numba imports here (imported on first ask: it takes ~0.5 s)."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # ImportError, or a broken llvmlite build
        log.info("numba unavailable (%s): the -v renderer uses its PyTorch path", exc)
        return False
    return True


@lru_cache(maxsize=None)
def kernel(name: str):
    """The compiled kernel `name` ('project_with_normals', 'visible_faces' or
    'shade'), compiled on first use."""
    import numba

    # Shading may reassociate floating point (no NaN/inf assumptions): colours
    # move by a rounding step at most; visibility must not, or shared edges
    # could leak.
    fastmath = {"reassoc", "contract", "arcp", "nsz"} if name == "shade" else False
    return numba.njit(cache=True, nogil=True, fastmath=fastmath)(globals()["_" + name])


def _project_with_normals(verts, K, faces, screen, normals):  # pragma: no cover - compiled
    """screen [V,3] = cameras.project_screen(verts [V,3], K [3,3]); normals [V,3] =
    render.vertex_normals (area-weighted, unit length)."""
    fx, skew, cx, fy, cy = K[0, 0], K[0, 1], K[0, 2], K[1, 1], K[1, 2]
    for i in range(verts.shape[0]):
        x, y, z = verts[i, 0], verts[i, 1], verts[i, 2]
        screen[i, 0] = fx * (x / z) + skew * (y / z) + cx
        screen[i, 1] = fy * (y / z) + cy
        screen[i, 2] = z
    normals[:] = 0.0
    for f in range(faces.shape[0]):
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        ax, ay, az = verts[i1, 0] - verts[i0, 0], verts[i1, 1] - verts[i0, 1], verts[i1, 2] - verts[i0, 2]
        bx, by, bz = verts[i2, 0] - verts[i0, 0], verts[i2, 1] - verts[i0, 1], verts[i2, 2] - verts[i0, 2]
        nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
        for i in (i0, i1, i2):
            normals[i, 0] += nx
            normals[i, 1] += ny
            normals[i, 2] += nz
    for i in range(normals.shape[0]):
        norm = max(math.sqrt(normals[i, 0] ** 2 + normals[i, 1] ** 2 + normals[i, 2] ** 2), 1e-12)
        normals[i, 0] /= norm
        normals[i, 1] /= norm
        normals[i, 2] /= norm


def _visible_faces(screen, faces, near, height, width, wbuf, fbuf):  # pragma: no cover - compiled
    """Fill fbuf [H*W] int32 with the visible face per pixel (-1: none) and
    wbuf [H*W] float32 with its 1/z. screen: [V,3] float32 (u, v, z)."""
    wbuf[:] = 0.0
    fbuf[:] = -1
    for f in range(faces.shape[0]):
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        u0, v0, z0 = screen[i0, 0], screen[i0, 1], screen[i0, 2]
        u1, v1, z1 = screen[i1, 0], screen[i1, 1], screen[i1, 2]
        u2, v2, z2 = screen[i2, 0], screen[i2, 1], screen[i2, 2]
        if not (z0 > near and z1 > near and z2 > near):
            continue
        area = (u1 - u0) * (v2 - v0) - (v1 - v0) * (u2 - u0)
        if area == 0 or not math.isfinite(area):
            continue
        # vertices top to bottom, so each edge's crossing is computed from its
        # upper end whichever triangle asks (no gaps between neighbours)
        tu, tv, tw = u0, v0, 1.0 / z0
        mu, mv, mw = u1, v1, 1.0 / z1
        bu, bv, bw = u2, v2, 1.0 / z2
        if mv < tv:
            tu, tv, tw, mu, mv, mw = mu, mv, mw, tu, tv, tw
        if bv < mv:
            mu, mv, mw, bu, bv, bw = bu, bv, bw, mu, mv, mw
            if mv < tv:
                tu, tv, tw, mu, mv, mw = mu, mv, mw, tu, tv, tw
        slope_long = (bu - tu) / (bv - tv) if bv > tv else 0.0
        slope_upper = (mu - tu) / (mv - tv) if mv > tv else 0.0
        slope_lower = (bu - mu) / (bv - mv) if bv > mv else 0.0
        du1, dv1, du2, dv2 = mu - tu, mv - tv, bu - tu, bv - tv
        inv_area = 1.0 / (du1 * dv2 - dv1 * du2)
        dw1, dw2 = mw - tw, bw - tw
        gx = (dw1 * dv2 - dw2 * dv1) * inv_area
        gy = (dw2 * du1 - dw1 * du2) * inv_area
        y_first = max(int(math.ceil(tv)), 0)
        y_last = min(int(math.floor(bv)), height - 1)
        for y in range(y_first, y_last + 1):
            dy = y - tv
            x_long = tu + dy * slope_long
            if y < mv:
                x_short = tu + dy * slope_upper
            else:
                x_short = mu + (y - mv) * slope_lower
            x_first = max(int(math.ceil(min(x_long, x_short))), 0)
            x_last = min(int(math.floor(max(x_long, x_short))), width - 1)
            row = y * width
            for x in range(x_first, x_last + 1):
                w = tw + gx * (x - tu) + gy * dy
                p = row + x
                if w > wbuf[p] or (w == wbuf[p] and f < fbuf[p]):
                    wbuf[p] = w
                    fbuf[p] = f


def _shade(screen, faces, fbuf, width, normals, albedo_mode, colours, face_uvs, texture,
           light_mode, light, sh, background, image):  # pragma: no cover - compiled
    """Write image [H*W,3] uint8: background where fbuf < 0, else the shaded surface.

    Per pixel: perspective-correct barycentrics of the visible face, the
    interpolated vertex normal (normalised), albedo (0: grey 0.75, 1:
    per-vertex `colours` [V,3], 2: `texture` [Ht,Wt,3] sampled bilinearly at
    the interpolated `face_uvs` [F,3,2] as grid_sample with align_corners=False
    and border padding), light (0: Lambert, light = (lx, ly, lz, ambient,
    diffuse); 1: SH `sh` [9,3] with DECA's per-band constants in light[0:9]).
    """
    n_tex_rows, n_tex_cols = texture.shape[0], texture.shape[1]
    # per face: vertex 0 and the screen-space barycentric planes of vertices 1, 2
    planes = np.empty((faces.shape[0], 6))
    for f in range(faces.shape[0]):
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        u0, v0 = screen[i0, 0], screen[i0, 1]
        du1, dv1 = screen[i1, 0] - u0, screen[i1, 1] - v0
        du2, dv2 = screen[i2, 0] - u0, screen[i2, 1] - v0
        area = du1 * dv2 - dv1 * du2
        inv_area = 1.0 / area if area != 0 else 0.0
        planes[f, 0], planes[f, 1] = u0, v0
        planes[f, 2], planes[f, 3] = dv2 * inv_area, -du2 * inv_area
        planes[f, 4], planes[f, 5] = -dv1 * inv_area, du1 * inv_area
    for p in range(fbuf.shape[0]):
        f = fbuf[p]
        if f < 0:
            image[p, 0], image[p, 1], image[p, 2] = background[0], background[1], background[2]
            continue
        y = p // width
        x = p - y * width
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        dx, dy = x - planes[f, 0], y - planes[f, 1]
        b1 = planes[f, 2] * dx + planes[f, 3] * dy
        b2 = planes[f, 4] * dx + planes[f, 5] * dy
        # perspective-correct: screen barycentrics weighted by 1/z
        l0 = (1.0 - b1 - b2) / screen[i0, 2]
        l1 = b1 / screen[i1, 2]
        l2 = b2 / screen[i2, 2]
        inv_total = 1.0 / (l0 + l1 + l2)
        l0, l1, l2 = l0 * inv_total, l1 * inv_total, l2 * inv_total
        nx = l0 * normals[i0, 0] + l1 * normals[i1, 0] + l2 * normals[i2, 0]
        ny = l0 * normals[i0, 1] + l1 * normals[i1, 1] + l2 * normals[i2, 1]
        nz = l0 * normals[i0, 2] + l1 * normals[i1, 2] + l2 * normals[i2, 2]
        norm = max(math.sqrt(nx * nx + ny * ny + nz * nz), 1e-12)
        nx, ny, nz = nx / norm, ny / norm, nz / norm
        if light_mode == 0:
            cosine = max(nx * light[0] + ny * light[1] + nz * light[2], 0.0)
            s = light[3] + light[4] * cosine
            s0 = s1 = s2 = s
        else:
            # DECA's frame: x right, y up, z towards the viewer
            bx, by, bz = nx, -ny, -nz
            s0 = s1 = s2 = 0.0
            for k in range(9):
                if k == 0:
                    b = 1.0
                elif k == 1:
                    b = bx
                elif k == 2:
                    b = by
                elif k == 3:
                    b = bz
                elif k == 4:
                    b = bx * by
                elif k == 5:
                    b = bx * bz
                elif k == 6:
                    b = by * bz
                elif k == 7:
                    b = bx * bx - by * by
                else:
                    b = 3 * bz * bz - 1
                b *= light[k]
                s0 += b * sh[k, 0]
                s1 += b * sh[k, 1]
                s2 += b * sh[k, 2]
        if albedo_mode == 0:
            a0 = a1 = a2 = 0.75
        elif albedo_mode == 1:
            a0 = l0 * colours[i0, 0] + l1 * colours[i1, 0] + l2 * colours[i2, 0]
            a1 = l0 * colours[i0, 1] + l1 * colours[i1, 1] + l2 * colours[i2, 1]
            a2 = l0 * colours[i0, 2] + l1 * colours[i1, 2] + l2 * colours[i2, 2]
        else:
            tu_ = l0 * face_uvs[f, 0, 0] + l1 * face_uvs[f, 1, 0] + l2 * face_uvs[f, 2, 0]
            tv_ = l0 * face_uvs[f, 0, 1] + l1 * face_uvs[f, 1, 1] + l2 * face_uvs[f, 2, 1]
            # grid_sample, align_corners=False: u = 0 is the left edge of texel 0
            cx = min(max(tu_ * n_tex_cols - 0.5, 0.0), n_tex_cols - 1.0)
            cy = min(max((1.0 - tv_) * n_tex_rows - 0.5, 0.0), n_tex_rows - 1.0)
            c0, r0 = int(math.floor(cx)), int(math.floor(cy))
            c1, r1 = min(c0 + 1, n_tex_cols - 1), min(r0 + 1, n_tex_rows - 1)
            fx, fy = cx - c0, cy - r0
            a0 = ((1 - fy) * ((1 - fx) * texture[r0, c0, 0] + fx * texture[r0, c1, 0])
                  + fy * ((1 - fx) * texture[r1, c0, 0] + fx * texture[r1, c1, 0]))
            a1 = ((1 - fy) * ((1 - fx) * texture[r0, c0, 1] + fx * texture[r0, c1, 1])
                  + fy * ((1 - fx) * texture[r1, c0, 1] + fx * texture[r1, c1, 1]))
            a2 = ((1 - fy) * ((1 - fx) * texture[r0, c0, 2] + fx * texture[r0, c1, 2])
                  + fy * ((1 - fx) * texture[r1, c0, 2] + fx * texture[r1, c1, 2]))
        # as round(clamp(rgb, 0, 1) * 255) on the float image
        image[p, 0] = int(round(min(max(a0 * s0, 0.0), 1.0) * 255.0))
        image[p, 1] = int(round(min(max(a1 * s1, 0.0), 1.0) * 255.0))
        image[p, 2] = int(round(min(max(a2 * s2, 0.0), 1.0) * 255.0))


