import os
import pickle

import pytest
import torch
from reference_weights import deterministic_state_dict

from pipeline.models.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    load_into,
    load_state_dict,
    save_state_dict,
    sha256_of,
)
from pipeline.models.stylegan2 import Discriminator, Generator


def tiny_g():
    return Generator(32, style_dim=16, n_mlp=2, channel_max=8)


def test_round_trip_local_and_s3(tmp_path, s3_bucket):
    G = tiny_g()
    for uri in (str(tmp_path / "g.pth"), f"s3://{s3_bucket}/w/g.pth"):
        digest = save_state_dict(G, uri)
        assert digest == sha256_of(uri)
        G2 = tiny_g()
        load_into(G2, load_state_dict(uri), source=uri)
        for (k, a), (_, b) in zip(G.state_dict().items(), G2.state_dict().items()):
            assert torch.equal(a, b), k


def test_manifest_shaped_dicts_load_strict():
    load_into(Discriminator(256), deterministic_state_dict("D256"), source="D256")


@pytest.mark.reliability
def test_mismatch_lists_every_problem(tmp_path):
    sd = deterministic_state_dict("D256")
    sd.pop("final_linear.1.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["final_conv.0.weight"] = torch.zeros(512, 512, 3, 3)
    path = tmp_path / "netD.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_into(Discriminator(256), load_state_dict(path), source=str(path))
    msg = str(exc.value)
    assert "netD.pth" in msg
    assert "missing keys: final_linear.1.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "final_conv.0.weight: expected (512, 513, 3, 3), got (512, 512, 3, 3)" in msg


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.reliability
def test_pickled_objects_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"weight": torch.zeros(1), "payload": _Evil(marker)}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.reliability
def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="list.pth: expected a state dict"):
        load_state_dict(path)
    nested = tmp_path / "nested.pth"
    torch.save({"a": {"b": 1}}, nested)
    with pytest.raises(CheckpointError, match="nested.pth: not a plain state dict"):
        load_state_dict(nested)


@pytest.mark.reliability
def test_garbage_empty_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch file"):
        load_state_dict(tmp_path / "junk.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: file is empty"):
        load_state_dict(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="nope.pth: cannot be read"):
        load_state_dict(tmp_path / "nope.pth")


def test_rosinality_checkpoint_loads_its_g_ema_weights(tmp_path):
    torch.manual_seed(1)
    G = tiny_g()
    path = tmp_path / "550000.pt"
    torch.save({"g_ema": G.state_dict(), "d": Discriminator(32, channel_max=8).state_dict()}, path)
    # two wrapped dicts: "d" is not a known wrapper key, so g_ema is picked
    torch.manual_seed(2)
    loaded = tiny_g()
    assert not torch.equal(loaded.input.input, G.input.input)  # other weights before loading
    load_into(loaded, load_state_dict(path), source=str(path))
    want = G.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
