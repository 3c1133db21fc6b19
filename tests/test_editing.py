"""Using a customised model as the paper does: GANSpace edits, blends of two models, projection of an image.

Models come from the committed toy base (benchmarks/assets/shapes_base): "customised" runs are built here in
the run contract's layout, with the base's weights and a perturbed mapping (or synthesis) network, and the base
recorded as their origin, so these tests do not depend on training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from overrides import with_overrides
from PIL import Image

from pipeline import cli, layout, storage
from pipeline.config import Config
from pipeline.edit import blend, ganspace, projection
from pipeline.models import factory, sampling
from pipeline.models.checkpoints import load_state_dict, save_state_dict, sha256_of

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "benchmarks" / "assets" / "shapes_base"
ARCH = json.loads((BASE / "metadata.json").read_text())["arch"]


@pytest.fixture
def cfg(tmp_path) -> Config:
    return with_overrides(Config(), [f"storage.root={tmp_path / 'root'}"])


@pytest.fixture
def base(tmp_path) -> str:
    """A copy of the committed base folder without its components (the tests write them)."""
    out = tmp_path / "base"
    shutil.copytree(BASE, out, ignore=shutil.ignore_patterns("ganspace-*.npz"))
    return str(out)


def customised(cfg: Config, base: str, name: str, seed: int, part: str = "style.") -> str:
    """A finished run whose G is the base with the ``part`` weights perturbed, recording the base as origin."""
    state = load_state_dict(f"{base}/G.pth")
    gen = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.startswith(part) and v.is_floating_point() and v.numel() > 1 and not k.startswith("noises."):
            state[k] = v + 0.3 * v.std() * torch.randn(v.shape, generator=gen)
    run = layout.run_uri(cfg, name)
    sha = save_state_dict(state, layout.final_uri(run, layout.G_FILE))
    storage.write_json(layout.final_metadata_uri(run), {
        "run_name": name, "kind": "train", "arch": ARCH, "category": "shapes", "sketch_set": {"name": name},
        "base_g": f"{base}/G.pth", "base_g_sha256": sha256_of(f"{base}/G.pth"), "g_sha256": sha,
        "config": cfg.model_dump(mode="json")})
    return run


def generator(uri: str):
    return factory.load_generator(uri, ARCH, "cpu")


def png_array(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# -- GANSpace -----------------------------------------------------------------------------------------------
def test_components_are_the_principal_axes_of_w(base):
    G = generator(f"{base}/G.pth")
    c = ganspace.compute(G, n_samples=4000, n_components=10, seed=1)
    assert torch.allclose(c.comp @ c.comp.T, torch.eye(10), atol=1e-5)  # orthonormal rows
    assert torch.all(c.stdev[:-1] >= c.stdev[1:])  # by decreasing variance
    # the same axes as an SVD of the centred samples (numpy, independent of our covariance route)
    z = torch.randn(4000, G.style_dim, generator=torch.Generator().manual_seed(1))
    w = G.get_latent(z).double().numpy()
    _, sv, vt = np.linalg.svd(w - w.mean(0), full_matrices=False)
    for i in range(5):
        assert abs(float(np.dot(vt[i], c.comp[i].double().numpy()))) > 0.999, i
    assert np.allclose(sv[:10] / np.sqrt(len(w) - 1), c.stdev.numpy(), rtol=1e-4)
    assert np.allclose(w.mean(0), c.mean.numpy(), atol=1e-5)


def test_published_layout_loads_and_scalar_zero_is_the_identity(cfg, base, tmp_path, capsys):
    d = ARCH["style_dim"]
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    published = tmp_path / "ganspace_shapes.npz"  # GANSpace's own layout, written with numpy alone
    np.savez(published, lat_comp=q.T[:, None, :].astype(np.float32), lat_mean=np.zeros((1, d), np.float32),
             lat_stdev=np.linspace(3, 1, d).astype(np.float32))
    c = ganspace.load(str(published))
    assert c.comp.shape == (d, d) and c.stdev[0] == 3
    args = ["generate", "--model", base, "--n", "4", "--seed", "5", "--ganspace", str(published)]
    assert cli.main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert cli.main([*args, "--edit", "3:0:0-7", "--out", str(tmp_path / "zero.png")]) == 0
    assert np.array_equal(png_array(tmp_path / "plain.png"), png_array(tmp_path / "zero.png"))
    assert cli.main([*args, "--edit", "0:4:0-7", "--out", str(tmp_path / "moved.png")]) == 0
    assert np.abs(png_array(tmp_path / "plain.png").astype(int) - png_array(tmp_path / "moved.png")).mean() > 5


def test_an_edit_shifts_exactly_its_layers_by_scalar_standard_deviations():
    c = ganspace.Components(torch.eye(4), torch.zeros(4), torch.tensor([2.0, 1.0, 1.0, 1.0]))
    w = torch.randn(3, 6, 4)
    out = ganspace.apply(w, [ganspace.parse_edit("0:1.5:2-3")], c)
    assert torch.equal(out[:, [0, 1, 4, 5]], w[:, [0, 1, 4, 5]])
    assert torch.allclose(out[:, 2:4] - w[:, 2:4], torch.tensor([3.0, 0, 0, 0]).expand(3, 2, 4))


@pytest.mark.parametrize("text, message", [("27:50", "expected COMP:SCALAR:FIRST-LAST"),
                                           ("1:x:2-3", "expected COMP:SCALAR"), ("1:2:5-3", "is empty")])
def test_bad_edits_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        ganspace.parse_edit(text)


def test_bad_component_files_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, lat_comp=np.zeros((3, 1, 8), np.float32), lat_mean=np.zeros((1, 8), np.float32))
    with pytest.raises(ganspace.ComponentsError, match=r"bad.npz: missing key\(s\) \['lat_stdev'\]"):
        ganspace.load(str(bad))
    np.savez(bad, lat_comp=np.zeros((3, 1, 8), np.float32), lat_mean=np.zeros((1, 8), np.float32),
             lat_stdev=np.ones(4, np.float32))
    with pytest.raises(ganspace.ComponentsError, match=r"lat_stdev has shape \(4,\), expected \(3,\)"):
        ganspace.load(str(bad))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ganspace.ComponentsError, match="junk.npz: not a readable npz"):
        ganspace.load(str(tmp_path / "junk.npz"))


def test_compute_beside_the_base_then_edit_a_customised_model(cfg, base, tmp_path, capsys):
    assert cli.main(["ganspace", "compute", "--base", base, "--samples", "3000"]) == 0
    npz = capsys.readouterr().out.strip().splitlines()[-1]
    assert npz == layout.ganspace_uri(f"{base}/G.pth", sha256_of(f"{base}/G.pth"))
    assert Path(npz).parent == Path(base) and ganspace.load(npz).comp.shape == (ARCH["style_dim"],) * 2
    run = customised(cfg, base, "cust", seed=1)
    out = tmp_path / "compare.png"
    assert cli.main(["generate", "--model", run, "--n", "3", "--edit", "0:3:0-3", "--edit", "1:-2:4-7",
                     "--compare", "--out", str(out)]) == 0
    grid = png_array(out)  # two rows of three 32 px tiles with 2 px separators
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)
    before = grid[2:34, 2:34]
    G = generator(layout.final_uri(run, layout.G_FILE))
    assert np.array_equal(before, sampling.render(G, [0], [1.0], "cpu")[0])  # the unedited row: plain seeds
    assert np.abs(grid[36:68, 2:34].astype(int) - before).mean() > 2  # the edited row differs
    # no components for a base: the message says how to make them
    bare = tmp_path / "bare"
    shutil.copytree(BASE, bare, ignore=shutil.ignore_patterns("ganspace-*.npz"))
    other = customised(cfg, str(bare), "elsewhere", seed=2)
    assert cli.main(["generate", "--model", other, "--edit", "0:1:0-1", "--out", str(tmp_path / "x.png")]) == 1
    assert "sketchgan ganspace compute --base" in capsys.readouterr().err


def test_the_committed_base_ships_its_components(tmp_path):
    """`generate --edit` works on the toy base and its customisations out of the box."""
    sha = sha256_of(BASE / "G.pth")
    c = ganspace.load(layout.ganspace_uri(str(BASE / "G.pth"), sha))
    assert c.comp.shape == (ARCH["style_dim"], ARCH["style_dim"])
    assert torch.allclose(c.comp @ c.comp.T, torch.eye(ARCH["style_dim"]), atol=1e-4)


def test_n_one_writes_exactly_one_image_without_a_frame(base, tmp_path):
    out = tmp_path / "one.png"
    assert cli.main(["generate", "--model", base, "--n", "1", "--seed", "7", "--out", str(out)]) == 0
    assert np.array_equal(png_array(out), sampling.render(generator(f"{base}/G.pth"), [7], [1.0], "cpu")[0])


# -- blends -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["w", "weights"])
def test_blend_endpoints_are_the_parents_and_a_self_blend_is_itself(cfg, base, space):
    a, b = customised(cfg, base, "a", seed=1, part=""), customised(cfg, base, "b", seed=2, part="")
    pa, pb = blend.load_parents(cfg, a, b, "cpu")
    seeds = [0, 1, 2]
    strip = blend.render_blend(pa, pb, space, [0.0, 0.5, 1.0], seeds, 1.0, "cpu").reshape(3, 3, 32, 32, 3)
    assert np.array_equal(strip[:, 0], sampling.render(pa.G, seeds, [1.0] * 3, "cpu"))
    assert np.array_equal(strip[:, 2], sampling.render(pb.G, seeds, [1.0] * 3, "cpu"))
    assert not np.array_equal(strip[:, 1], strip[:, 0]) and not np.array_equal(strip[:, 1], strip[:, 2])
    same = blend.render_blend(pa, pa, space, [0.3, 0.7], seeds, 1.0, "cpu").reshape(3, 2, 32, 32, 3)
    assert np.array_equal(same[:, 0], strip[:, 0]) and np.array_equal(same[:, 1], strip[:, 0])


def test_blend_of_different_bases_is_refused(cfg, base, tmp_path):
    a = customised(cfg, base, "a", seed=1)
    other_base = tmp_path / "other"
    shutil.copytree(BASE, other_base)
    state = load_state_dict(f"{other_base}/G.pth")
    save_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, f"{other_base}/G.pth")
    b = customised(cfg, str(other_base), "b", seed=2)
    with pytest.raises(ValueError, match="come from different bases"):
        blend.load_parents(cfg, a, b, "cpu")


def test_blend_strip_and_registered_blend_with_lineage(cfg, base, tmp_path, capsys):
    from pipeline.registry import tracking
    from pipeline.registry.mlflow_registry import resolve_model

    a, b = customised(cfg, base, "squares", seed=1), customised(cfg, base, "circles", seed=2)
    strip = tmp_path / "strip.png"
    assert cli.main(["blend", "--a", a, "--b", b, "--space", "w", "--steps", "4", "--n", "2",
                     "--out", str(strip)]) == 0
    assert png_array(strip).shape == (2 + 2 * 34, 2 + 4 * 34, 3)
    root = ["--set", f"storage.root={cfg.storage.root}"]
    assert cli.main(["blend", "--a", a, "--b", b, "--space", "w", "--alpha", "0.5", "--register", *root]) == 1
    assert "--register needs --space weights" in capsys.readouterr().err
    assert cli.main(["blend", "--a", a, "--b", b, "--alpha", "0.25", "--register", *root]) == 0
    assert "registered sketchgan-shapes-blend-squares-circles version 1" in capsys.readouterr().out
    version = tracking.client(cfg).get_model_version("sketchgan-shapes-blend-squares-circles", "1")
    lineage = json.loads(version.tags["sketchgan.blend"])
    assert lineage == {"a": a, "a_version": "", "b": b, "b_version": "", "alpha": 0.25, "space": "weights"}
    got = resolve_model("models:/sketchgan-shapes-blend-squares-circles/1", cfg).load_generator(cfg, "cpu")
    want = blend.blend_state(generator(layout.final_uri(a, "G.pth")).state_dict(),
                             generator(layout.final_uri(b, "G.pth")).state_dict(), 0.25)
    assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)


# -- projection ---------------------------------------------------------------------------------------------
def test_projection_of_a_generated_image_reconstructs_it(cfg, base, tmp_path, capsys):
    target = tmp_path / "target.png"
    assert cli.main(["generate", "--model", base, "--n", "1", "--seed", "3", "--out", str(target)]) == 0
    out = tmp_path / "proj"
    assert cli.main(["project", "--image", str(target), "--base", base, "--out", str(out), "--steps", "300"]) == 0
    printed = capsys.readouterr().out
    recon = png_array(out / "reconstruction.png")
    want = png_array(target)
    assert recon.shape == want.shape == (32, 32, 3)
    G = generator(f"{base}/G.pth")
    with torch.no_grad():
        mean_image = sampling.to_uint8(G([G.mean_latent(4096)], input_is_latent=True, randomize_noise=False)[0])[0]
    got, baseline = projection.psnr(recon, want), projection.psnr(mean_image, want)
    assert got >= 25 and got >= baseline + 10, (got, baseline)
    assert f"PSNR {got:.2f} dB" in printed
    # rendered through a model whose synthesis changed: the same latent, another image; through the base: itself
    changed = customised(cfg, base, "synth", seed=4, part="convs.")
    assert cli.main(["generate", "--model", base, "--latent", str(out / "latent.pt"),
                     "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(png_array(tmp_path / "again.png"), recon)
    assert cli.main(["generate", "--model", changed, "--latent", str(out / "latent.pt"),
                     "--out", str(tmp_path / "changed.png")]) == 0
    assert not np.array_equal(png_array(tmp_path / "changed.png"), recon)


def test_projection_in_z_renders_differently_through_a_customised_mapping(cfg, base, tmp_path):
    G = generator(f"{base}/G.pth")
    target = torch.from_numpy(sampling.render(G, [2], [1.0], "cpu")).permute(0, 3, 1, 2).float() / 127.5 - 1
    record = projection.project(G, target, projection.ProjectSettings(steps=30, space="z"))
    assert record["latent"].shape == (1, ARCH["style_dim"])
    mapped = generator(layout.final_uri(customised(cfg, base, "m", seed=3), "G.pth"))
    assert not np.array_equal(projection.render_latent(G, record, "cpu"),
                              projection.render_latent(mapped, record, "cpu"))


def test_bad_images_and_latents_get_clear_errors(base, tmp_path, monkeypatch, capsys):
    run = ["project", "--base", base, "--out", str(tmp_path / "o"), "--steps", "2"]
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert cli.main([*run, "--image", str(tmp_path / "junk.png")]) == 1
    assert "junk.png: undecodable" in capsys.readouterr().err
    deep = Image.fromarray(np.full((8, 8), 300, np.uint16))
    assert deep.mode == "I;16"
    deep.save(tmp_path / "deep.png")
    assert cli.main([*run, "--image", str(tmp_path / "deep.png")]) == 1
    assert "deep.png: mode I;16" in capsys.readouterr().err
    monkeypatch.setattr(projection, "MAX_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    assert cli.main([*run, "--image", str(tmp_path / "big.png")]) == 1
    assert "big.png: decompression bomb refused: 20x20 = 400 pixels" in capsys.readouterr().err
    assert cli.main([*run, "--image", str(tmp_path / "missing.png")]) == 1
    assert "cannot read " in (err := capsys.readouterr().err) and "missing.png: [Errno 2]" in err
    torch.save({"space": "w+", "latent": torch.zeros(1, 4, 8), "size": 64, "style_dim": 8, "n_latent": 4},
               tmp_path / "other.pt")
    assert cli.main(["generate", "--model", base, "--latent", str(tmp_path / "other.pt"),
                     "--out", str(tmp_path / "x.png")]) == 1
    assert "projected for size 64, the model has 32" in capsys.readouterr().err


def test_projection_with_a_perceptual_distance(base, tmp_path):
    import torchvision

    from pipeline.eval.lpips import LPIPS

    torch.manual_seed(0)
    save_state_dict(torchvision.models.vgg16(weights=None), tmp_path / "vgg16.pth")
    dist = LPIPS(str(tmp_path / "vgg16.pth"))
    G = generator(f"{base}/G.pth")
    target = torch.from_numpy(sampling.render(G, [1], [1.0], "cpu")).permute(0, 3, 1, 2).float() / 127.5 - 1
    record = projection.project(G, target, projection.ProjectSettings(steps=5), distance=dist)
    assert record["space"] == "w+" and torch.isfinite(record["latent"]).all()


def test_pyfunc_consumers_get_edits_through_params(cfg, base, tmp_path):
    import mlflow
    import pandas as pd

    from pipeline.registry import tracking
    from pipeline.registry.mlflow_registry import register_run

    assert cli.main(["ganspace", "compute", "--base", base, "--samples", "3000"]) == 0
    run = customised(cfg, base, "withcomps", seed=1)
    name, version = register_run(cfg, run)
    bare = tmp_path / "bare"
    shutil.copytree(BASE, bare, ignore=shutil.ignore_patterns("ganspace-*.npz"))
    name2, version2 = register_run(cfg, customised(cfg, str(bare), "nocomps", seed=2))
    with tracking.activated(cfg):
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        plain = model.predict(pd.DataFrame({"seed": [4, 5], "truncation": [0.7, 1.0]}))
        edited = model.predict(pd.DataFrame({"seed": [4, 5], "truncation": [0.7, 1.0]}),
                               params={"edits": "0:3:0-3; 2:-1.5:4-7"})
        other = mlflow.pyfunc.load_model(f"models:/{name2}/{version2}")
        with pytest.raises(Exception, match="registered without its base's GANSpace components"):
            other.predict(pd.DataFrame({"seed": [1]}), params={"edits": "0:1:0-1"})
    G = generator(layout.final_uri(run, layout.G_FILE))
    comps = ganspace.load(layout.ganspace_uri(f"{base}/G.pth", sha256_of(f"{base}/G.pth")))
    edits = [ganspace.parse_edit("0:3:0-3"), ganspace.parse_edit("2:-1.5:4-7")]
    assert np.array_equal(plain, sampling.render(G, [4, 5], [0.7, 1.0], "cpu"))
    assert np.array_equal(edited, ganspace.render_edited(G, [4, 5], [0.7, 1.0], edits, comps, "cpu"))
    assert not np.array_equal(edited, plain)
