"""Asset check/require/fetch, against synthetic files of the real structure and
a real HTTP server on 127.0.0.1 serving fixture archives."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import shutil
import threading
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ft import assets
from lightning_ft.assets import DOWNLOADS, check, fetch, format_report, main_check, main_fetch, require
from lightning_ft.errors import AssetError, UsageError
from lightning_ft.flame import load_flame_model
from lightning_ft.synthetic.texture_files import write_synthetic_bfm_albedo, write_synthetic_texture

CKPT_RELATIVE = "detail/checkpoints/deca-epoch=10-val_loss/dataloader_idx_0=3.25521111.ckpt"
REAL_EMBEDDING_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "real-assets" / "FLAME_embedding.zip"
FLAME_USER, FLAME_PASS = "ada@example.org", "s3cret&=?"  # characters that need form encoding


# ----------------------------------------------------------------------------
# Fixture files


def write_emoca_release(root: Path, n_values: int = 1000, legacy: bool = False) -> Path:
    """A tiny EMOCA_v2_lr_mse_20 stand-in: cfg.yaml + one Lightning-style ckpt
    in the real nested folder (the '/' of a metric name made a subfolder)."""
    release = root / assets.EMOCA_RELEASE
    (release / CKPT_RELATIVE).parent.mkdir(parents=True, exist_ok=True)
    (release / "cfg.yaml").write_text("coarse:\n  model:\n    n_exp: 50\ndetail:\n  model:\n    n_exp: 50\n")
    g = torch.Generator().manual_seed(0)
    ckpt = {"epoch": 10, "global_step": 1, "pytorch-lightning_version": "1.4.9",
            "state_dict": {"deca.E_flame.layers.0.weight": torch.randn(n_values, generator=g),
                           "deca.E_expression.layers.0.weight": torch.randn(8, generator=g)}}
    torch.save(ckpt, release / CKPT_RELATIVE, _use_new_zipfile_serialization=not legacy)
    return release


def zip_folder(folder: Path, dest: Path, arc_root: Path) -> bytes:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(arc_root).as_posix())
    return dest.read_bytes()


@pytest.fixture(scope="module")
def emoca_release(tmp_path_factory):
    return write_emoca_release(tmp_path_factory.mktemp("emoca"))


@pytest.fixture(scope="module")
def complete_dir(tmp_path_factory, assets_dir, emoca_release):
    """Every tier present: the conftest FLAME tier + EMOCA + texture space."""
    root = tmp_path_factory.mktemp("complete")
    shutil.copytree(assets_dir / "FLAME", root / "FLAME")
    shutil.copytree(emoca_release, root / "EMOCA" / assets.EMOCA_RELEASE)
    write_synthetic_texture(root / "FLAME" / "FLAME_texture.npz")
    return root


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "assets"
    shutil.copytree(folder, dest)
    return dest


def by_name(statuses):
    return {s.name: s for s in statuses}


def leftovers(folder: Path):
    """Hidden temporaries a fetch may have left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# ----------------------------------------------------------------------------
# check: the three reports of the issue


def test_check_empty_folder_reports_every_file_missing(tmp_path, capsys):
    statuses = check(tmp_path)
    assert [s.name for s in statuses] == [s.name for s in assets.ASSET_SPECS]
    assert all(s.state == "missing" for s in statuses)
    assert {s.tier for s in statuses} == set(assets.TIERS)
    assert main_check(tmp_path) == AssetError.exit_code
    out = capsys.readouterr().out
    for spec in assets.ASSET_SPECS:
        assert spec.name in out and spec.how_to_get in out
    assert "FLAME tier (every run): 3 missing" in out
    assert "EMOCA tier" in out and "1 missing" in out


def test_check_complete_synthetic_folder_is_all_present(complete_dir, flame_files, capsys):
    statuses = by_name(check(complete_dir))
    assert all(s.state == "present" for s in statuses.values()), format_report(list(statuses.values()))
    model = load_flame_model(flame_files.model)
    assert f"{model.v_template.shape[0]} vertices" in statuses["FLAME/generic_model.pkl"].detail
    assert CKPT_RELATIVE in statuses[f"EMOCA/{assets.EMOCA_RELEASE}"].detail
    assert "64x64 texture, 8 components" in statuses["FLAME/FLAME_texture.npz"].detail
    assert main_check(complete_dir) == 0
    out = capsys.readouterr().out
    for tier in ("FLAME", "EMOCA", "synthesis"):
        assert f"{tier} tier" in out
    assert out.count(": ready") == 3 and "missing" not in out and "corrupt" not in out


@pytest.mark.parametrize("damage", ["truncated", "not_a_flame_dict"])
def test_check_corrupt_pickle(complete_dir, tmp_path, damage, capsys):
    folder = copy_of(complete_dir, tmp_path)
    pkl = folder / "FLAME" / "generic_model.pkl"
    if damage == "truncated":
        pkl.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
    else:
        pkl.write_bytes(pickle.dumps({"v_template": np.zeros((4, 3))}, protocol=2))
    statuses = by_name(check(folder))
    bad = statuses.pop("FLAME/generic_model.pkl")
    assert bad.state == "corrupt" and str(pkl) in bad.detail
    assert all(s.state == "present" for s in statuses.values())
    assert main_check(folder) == AssetError.exit_code
    out = capsys.readouterr().out
    assert "FLAME tier (every run): 1 corrupt" in out
    assert "EMOCA tier (EMOCA initialisation; skip with --no-emoca): ready" in out
    # the header-only check sees truncation, not a wrong dict (that needs the loader)
    shallow = by_name(check(folder, deep=False))["FLAME/generic_model.pkl"]
    assert shallow.state == ("corrupt" if damage == "truncated" else "present")


def test_check_finds_embeddings_in_the_original_nested_layout(complete_dir, tmp_path):
    folder = copy_of(complete_dir, tmp_path)
    (folder / "FLAME" / "FLAME_embedding").mkdir()
    os.replace(folder / "FLAME" / "landmark_embedding.npy", folder / "FLAME" / "FLAME_embedding" / "landmark_embedding.npy")
    status = by_name(check(folder))["FLAME/landmark_embedding.npy"]
    assert status.state == "missing"
    assert "FLAME/FLAME_embedding/landmark_embedding.npy exists: move it" in status.detail


def test_check_emoca_structure(complete_dir, tmp_path):
    folder = copy_of(complete_dir, tmp_path)
    release = folder / "EMOCA" / assets.EMOCA_RELEASE
    name = f"EMOCA/{assets.EMOCA_RELEASE}"
    ckpt = release / CKPT_RELATIVE

    shutil.copy(ckpt, ckpt.parent / "second.ckpt")
    assert by_name(check(folder))[name].state == "corrupt"
    assert "exactly one .ckpt" in by_name(check(folder))[name].detail
    (ckpt.parent / "second.ckpt").unlink()

    full = ckpt.read_bytes()
    ckpt.write_bytes(full[: len(full) - 200])  # a zip loses its central directory first
    assert by_name(check(folder, deep=False))[name].state == "corrupt"
    ckpt.write_bytes(full)

    (release / "cfg.yaml").unlink()
    assert "cfg.yaml" in by_name(check(folder))[name].detail


def test_check_accepts_legacy_checkpoint_and_rejects_other_files(tmp_path):
    release = write_emoca_release(tmp_path / "a" / "EMOCA", legacy=True)
    status = by_name(check(tmp_path / "a"))[f"EMOCA/{assets.EMOCA_RELEASE}"]
    assert status.state == "present" and "legacy torch checkpoint with a state_dict" in status.detail
    # a readable checkpoint without state_dict is not an EMOCA release
    torch.save({"weights": torch.zeros(3)}, release / CKPT_RELATIVE)
    assert "no state_dict" in by_name(check(tmp_path / "a"))[f"EMOCA/{assets.EMOCA_RELEASE}"].detail
    (release / CKPT_RELATIVE).write_bytes(b"<html>not found</html>")
    assert "not a torch checkpoint" in by_name(check(tmp_path / "a"))[f"EMOCA/{assets.EMOCA_RELEASE}"].detail


def test_check_texture_alternatives_and_wrong_shapes(tmp_path):
    write_synthetic_bfm_albedo(tmp_path / "FLAME" / "FLAME_albedo_from_BFM.npz", size=16, n_comp=5)
    status = [s for s in check(tmp_path) if s.tier == "synthesis"][0]
    assert status.name == "FLAME/FLAME_albedo_from_BFM.npz" and status.state == "present"
    assert "16x16 texture, 5 components" in status.detail
    bad = tmp_path / "FLAME" / "FLAME_texture.npz"
    np.savez(bad, mean=np.zeros((16, 16, 3)), tex_dir=np.zeros((16, 8, 3, 4)), vt=np.zeros((5, 2)), ft=np.zeros((3, 3)))
    status = [s for s in check(tmp_path) if s.tier == "synthesis"][0]
    assert status.name == "FLAME/FLAME_texture.npz" and status.state == "corrupt"
    assert "expected [H,W,3] and [H,W,3,K]" in status.detail


# ----------------------------------------------------------------------------
# require: the message a run prints before any work


def test_require_lists_one_line_per_missing_file(tmp_path):
    with pytest.raises(AssetError) as info:
        require(tmp_path, {"flame"})
    lines = str(info.value).splitlines()
    assert lines[0] == f"missing assets in {tmp_path} (FLAME tier):"
    assert len(lines) == 4
    assert lines[1] == ("  FLAME/generic_model.pkl — FLAME 2020 model; register at flame.is.tue.mpg.de and run "
                        "'lightning-ft assets fetch' (or unzip FLAME2020.zip into assets/FLAME)")
    assert lines[2].startswith("  FLAME/landmark_embedding.npy — 68-point landmark embedding")
    assert lines[3].startswith("  FLAME/mediapipe_landmark_embedding.npz — MediaPipe landmark embedding")
    assert info.value.exit_code == AssetError.exit_code


def test_require_checks_only_the_tiers_asked_for(complete_dir, tmp_path):
    folder = copy_of(complete_dir, tmp_path)
    shutil.rmtree(folder / "EMOCA")
    (folder / "FLAME" / "FLAME_texture.npz").unlink()
    require(folder, assets.tiers_for(emoca=False))  # --no-emoca run: nothing missing
    with pytest.raises(AssetError) as info:
        require(folder, assets.tiers_for(emoca=True, synthesis=True))
    lines = str(info.value).splitlines()
    assert lines[0] == f"missing assets in {folder} (EMOCA + synthesis tiers):"
    assert [line.split(" — ")[0].strip() for line in lines[1:]] == [f"EMOCA/{assets.EMOCA_RELEASE}", "FLAME/FLAME_texture.npz"]
    assert "--no-emoca" in lines[1]


def test_require_reports_corrupt_files(complete_dir, tmp_path):
    folder = copy_of(complete_dir, tmp_path)
    pkl = folder / "FLAME" / "generic_model.pkl"
    pkl.write_bytes(pkl.read_bytes()[:1000])
    with pytest.raises(AssetError) as info:
        require(folder, {"flame"})
    lines = str(info.value).splitlines()
    assert lines[0] == f"missing or corrupt assets in {folder} (FLAME tier):"
    assert len(lines) == 2 and "FLAME 2020 model, corrupt:" in lines[1] and "truncated" in lines[1]
    with pytest.raises(UsageError):
        require(folder, {"flame", "gpu"})


def test_resolve_assets_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.ENV_ASSETS, str(tmp_path / "from_env"))
    assert assets.resolve_assets_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    assert assets.resolve_assets_dir(None) == tmp_path / "from_env"
    monkeypatch.delenv(assets.ENV_ASSETS)
    assert assets.resolve_assets_dir(None) == Path("assets")


def test_download_url_overrides(monkeypatch):
    monkeypatch.delenv(assets.ENV_DOWNLOAD_BASE, raising=False)
    monkeypatch.delenv("LIGHTNING_FT_URL_FLAME", raising=False)
    flame = DOWNLOADS["flame"]
    assert assets.download_url(flame) == flame.url
    monkeypatch.setenv(assets.ENV_DOWNLOAD_BASE, "http://127.0.0.1:8123/mirror/")
    assert assets.download_url(flame) == "http://127.0.0.1:8123/mirror/download.php?domain=flame&sfile=FLAME2020.zip&resume=1"
    monkeypatch.setenv("LIGHTNING_FT_URL_FLAME", "http://example.invalid/x.zip")
    assert assets.download_url(flame) == "http://example.invalid/x.zip"
    monkeypatch.setenv(assets.ENV_DOWNLOAD_BASE, "not a url")
    with pytest.raises(UsageError):
        assets.download_url(DOWNLOADS["emoca"])


# ----------------------------------------------------------------------------
# fetch against a real HTTP server


class FixtureServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FixtureHandler)
        self.routes = {}  # path?query -> dict(body=bytes, mode='ok'|'truncate'|'html', account=(user, pw))
        self.requests = []  # (method, path?query, form dict)


class FixtureHandler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold a server thread forever

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve({})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        form = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
        self._serve(form)

    def _serve(self, form):
        self.server.requests.append((self.command, self.path, form))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if "account" in route and (form.get("username"), form.get("password")) != route["account"]:
            if route.get("refuse") == "html":  # a login page with status 200
                page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            else:
                self.send_error(403)
            return
        body = route["body"]
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route.get("mode") == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    srv = FixtureServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def archives(tmp_path_factory, flame_files):
    """Fixture archives shaped like the real downloads (bytes)."""
    tmp = tmp_path_factory.mktemp("archives")
    # EMOCA: one wrapping folder, a checkpoint of ~2 MB so the stream has several chunks
    emoca_root = tmp / "emoca"
    write_emoca_release(emoca_root, n_values=500_000)
    emoca = zip_folder(emoca_root / assets.EMOCA_RELEASE, tmp / "EMOCA_v2_lr_mse_20.zip", emoca_root)
    # FLAME2020.zip: files at the top level
    flame_zip = tmp / "FLAME2020.zip"
    with zipfile.ZipFile(flame_zip, "w", zipfile.ZIP_STORED) as z:
        z.write(flame_files.model, "generic_model.pkl")
        for name in ("female_model.pkl", "male_model.pkl"):  # not installed: small stand-ins
            z.writestr(name, pickle.dumps({"stand_in": name}, protocol=2))
        z.writestr("Readme.pdf", b"%PDF-1.4 stand-in")
    texture_zip = tmp / "TextureSpace.zip"
    with zipfile.ZipFile(texture_zip, "w") as z:
        z.write(write_synthetic_texture(tmp / "FLAME_texture.npz", size=16, n_comp=4), "FLAME_texture.npz")
        z.writestr("Readme.pdf", b"%PDF-1.4 stand-in")
    # the embedding zip wraps its files in FLAME_embedding/: the real bytes when at hand
    if REAL_EMBEDDING_ZIP.exists():
        embedding, embedding_source = REAL_EMBEDDING_ZIP.read_bytes(), DOWNLOADS["embedding"]
    else:
        emb_zip = tmp / "FLAME_embedding.zip"
        with zipfile.ZipFile(emb_zip, "w") as z:
            z.write(flame_files.landmark_embedding, "FLAME_embedding/landmark_embedding.npy")
            z.write(flame_files.mediapipe_embedding, "FLAME_embedding/mediapipe_landmark_embedding.npz")
        embedding = emb_zip.read_bytes()
        embedding_source = dataclasses.replace(DOWNLOADS["embedding"], size=len(embedding),
                                               sha256=hashlib.sha256(embedding).hexdigest())
    synthetic_embedding = tmp / "synthetic_embedding.zip"
    with zipfile.ZipFile(synthetic_embedding, "w") as z:
        z.write(flame_files.landmark_embedding, "FLAME_embedding/landmark_embedding.npy")
        z.write(flame_files.mediapipe_embedding, "FLAME_embedding/mediapipe_landmark_embedding.npz")
        # Without ../shared the pinned archive zips the same two files: this
        # entry keeps the two archives' bytes (and checksums) different.
        z.writestr("FLAME_embedding/embedding_readme.txt", "a different archive")
    return {"emoca": emoca, "flame": flame_zip.read_bytes(), "texture": texture_zip.read_bytes(),
            "embedding": embedding, "synthetic_embedding": synthetic_embedding.read_bytes(),
            "sources": dict(DOWNLOADS, embedding=embedding_source)}


def route_key(item: str) -> str:
    parts = urllib.parse.urlsplit(DOWNLOADS[item].url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


@pytest.fixture
def served(server, archives, monkeypatch):
    """The server with every archive at its real path and query; the table's
    hosts redirected to it through LIGHTNING_FT_DOWNLOAD_BASE."""
    server.routes.clear()
    server.requests.clear()
    for item in DOWNLOADS:
        server.routes[route_key(item)] = {"body": archives[item]}
        if DOWNLOADS[item].needs_account:
            server.routes[route_key(item)]["account"] = (FLAME_USER, FLAME_PASS)
    host, port = server.server_address[:2]
    monkeypatch.setenv(assets.ENV_DOWNLOAD_BASE, f"http://{host}:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for item in DOWNLOADS:
        monkeypatch.delenv(assets.ENV_URL_PREFIX + item.upper(), raising=False)
    monkeypatch.setenv(assets.ENV_FLAME_USERNAME, FLAME_USER)
    monkeypatch.setenv(assets.ENV_FLAME_PASSWORD, FLAME_PASS)
    monkeypatch.setattr("sys.stdin", io.StringIO())  # never prompt inside tests
    return server


def test_fetch_installs_every_item_into_the_layout(served, archives, tmp_path, flame_files):
    folder = tmp_path / "assets"
    statuses = fetch(folder, items=("emoca", "flame", "embedding", "texture"), sources=archives["sources"], progress=False)
    assert [s.state for s in statuses] == ["present"] * 5, [s.detail for s in statuses]
    assert all(s.state == "present" for s in check(folder))
    assert (folder / "FLAME" / "generic_model.pkl").read_bytes() == flame_files.model.read_bytes()
    assert (folder / "FLAME" / "Readme_FLAME.pdf").exists() and (folder / "FLAME" / "Readme_Texture.pdf").exists()
    assert (folder / "EMOCA" / assets.EMOCA_RELEASE / CKPT_RELATIVE).is_file()
    assert not (folder / "FLAME" / "female_model.pkl").exists()  # only what the tracker uses
    assert leftovers(folder) == []
    flame_requests = [r for r in served.requests if "sfile=FLAME2020.zip" in r[1]]
    assert flame_requests == [("POST", route_key("flame"), {"username": FLAME_USER, "password": FLAME_PASS})]
    assert ("GET", route_key("emoca"), {}) in served.requests
    # a second fetch finds everything present and downloads nothing
    served.requests.clear()
    fetch(folder, items=tuple(DOWNLOADS), sources=archives["sources"], progress=False)
    assert served.requests == []


@pytest.mark.parametrize("refuse", ["403", "html"])
def test_fetch_with_a_wrong_password_installs_nothing(served, archives, tmp_path, monkeypatch, refuse):
    served.routes[route_key("flame")]["refuse"] = refuse
    monkeypatch.setenv(assets.ENV_FLAME_PASSWORD, "wrong")
    folder = tmp_path / "assets"
    statuses = by_name(fetch(folder, items=("flame", "emoca"), sources=archives["sources"], progress=False))
    flame = statuses["FLAME/generic_model.pkl"]
    assert flame.state == "missing"
    expected = "refused the account (HTTP 403)" if refuse == "403" else "got a web page instead of the zip FLAME2020.zip"
    assert expected in flame.detail and "account" in flame.detail
    assert statuses[f"EMOCA/{assets.EMOCA_RELEASE}"].state == "present"  # one failure does not stop the others
    assert not (folder / "FLAME").exists() and leftovers(folder) == []


def test_fetch_without_credentials_and_no_terminal_says_what_to_set(served, archives, tmp_path, monkeypatch):
    monkeypatch.delenv(assets.ENV_FLAME_USERNAME)
    monkeypatch.delenv(assets.ENV_FLAME_PASSWORD)
    status = fetch(tmp_path, items=("flame",), sources=archives["sources"], progress=False)[0]
    assert status.state == "missing"
    assert "set FLAME_USERNAME and FLAME_PASSWORD" in status.detail
    assert served.requests == []


def test_truncated_download_leaves_nothing(served, archives, tmp_path):
    served.routes[route_key("emoca")]["mode"] = "truncate"
    folder = tmp_path / "assets"
    status = fetch(folder, items=("emoca",), sources=archives["sources"], progress=False)[0]
    assert status.state == "missing"
    assert f"stopped after {len(archives['emoca']) // 2} of {len(archives['emoca'])} bytes" in status.detail
    assert not (folder / "EMOCA").exists() and leftovers(folder) == []


def test_corrupt_zip_is_reported_and_a_previous_file_kept(served, archives, tmp_path, complete_dir):
    folder = copy_of(complete_dir, tmp_path)
    old_model = folder / "FLAME" / "generic_model.pkl"
    old_model.write_bytes(old_model.read_bytes()[:500])  # a broken copy the user wants replaced
    broken_before = old_model.read_bytes()
    body = bytearray(archives["flame"])
    body[len(body) // 3] ^= 0xFF  # inside the stored model: CRC mismatch
    served.routes[route_key("flame")]["body"] = bytes(body)
    status = fetch(folder, items=("flame",), sources=archives["sources"], progress=False)[0]
    assert status.state == "corrupt"
    assert "fetch failed:" in status.detail and "nothing installed" in status.detail
    assert old_model.read_bytes() == broken_before and leftovers(folder) == []


def test_checksum_mismatch_installs_nothing(served, archives, tmp_path):
    served.routes[route_key("embedding")]["body"] = archives["synthetic_embedding"]
    pinned = dict(archives["sources"], embedding=dataclasses.replace(
        DOWNLOADS["embedding"], size=None, sha256=hashlib.sha256(archives["embedding"]).hexdigest()))
    statuses = fetch(tmp_path, items=("embedding",), sources=pinned, progress=False)
    assert [s.state for s in statuses] == ["missing", "missing"]
    assert "sha256" in statuses[0].detail and "nothing installed" in statuses[0].detail
    assert not (tmp_path / "FLAME").exists() and leftovers(tmp_path) == []


def test_interrupted_fetch_removes_its_partial_file(served, archives, tmp_path, monkeypatch):
    def interrupted_after_first_chunk(iterable, **kwargs):
        for i, chunk in enumerate(iterable):
            if i == 1:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(assets, "progress_bar", interrupted_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        fetch(tmp_path, items=("emoca",), sources=archives["sources"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_main_fetch_fetches_only_what_is_missing(served, archives, tmp_path, complete_dir, monkeypatch, capsys):
    folder = copy_of(complete_dir, tmp_path)
    (folder / "FLAME" / "FLAME_texture.npz").unlink()
    monkeypatch.setattr(assets, "DOWNLOADS", archives["sources"])
    assert main_fetch(folder, progress=False) == 0
    assert [r[1] for r in served.requests] == [route_key("texture")]
    assert "synthesis tier (--synthesis only): ready" in capsys.readouterr().out
    assert main_fetch(folder, progress=False) == 0
    assert "nothing to fetch" in capsys.readouterr().out
