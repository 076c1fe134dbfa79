import hashlib
import logging
import os
import stat
import struct
import zipfile

import pytest
import torch

from iris_pipelines.training.checkpoint import (
    KEEP_LAST,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_latest_ignores_temporary_files_and_old_ones_are_pruned(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"w": torch.ones(2) * step})
    (tmp_path / ".step_00000008.pt.abc.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000006.pt"
    assert len(list_checkpoints(tmp_path)) == KEEP_LAST
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 6


def test_a_checkpoint_is_readable_by_the_group_that_resumes_the_run(tmp_path, group_umask):
    group_umask(save_checkpoint(tmp_path / "checkpoints", 2, {"w": torch.ones(2)}))


def test_failed_write_leaves_no_checkpoint(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        save_checkpoint(tmp_path, 2, {"bad": lambda: None})
    assert list(tmp_path.iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path, 2, {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="step_00000002.pt"):
        load_checkpoint(path)


def test_a_checkpoint_from_more_gpus_resumes_on_fewer(monkeypatch):
    """A 2-GPU run's generator states, restored where one GPU is visible: the first is restored, no error."""
    two_gpus = [torch.ones(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)]
    state = {**capture_rng_state(), "cuda": two_gpus}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda rng_state, device: restored.append((rng_state, device))
    )
    restore_rng_state(state)
    assert [device for _, device in restored] == [0] and torch.equal(restored[0][0], two_gpus[0])


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    """Otherwise every requeue of the job fails on the same file while a good one sits beside it."""
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    newest = save_checkpoint(tmp_path, 4, {"w": torch.ones(3)})
    newest.write_bytes(newest.read_bytes()[:50])
    path, payload = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000002.pt" and payload["step"] == 2
    assert "step_00000004.pt" in caplog.text and "trying the checkpoint before it" in caplog.text
    path.write_bytes(b"junk")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* can be read .*step_00000004.*step_00000002"):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "none") is None


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    """A paper-size leftover is ~0.8 GB, and a job requeued many times would pile them up."""
    (tmp_path / ".step_00000004.pt.98d8f6.tmp").write_bytes(b"killed mid-write")
    (tmp_path / ".step_00000004.pt.sha256.98d8f6.tmp").write_bytes(b"killed mid-write")
    save_checkpoint(tmp_path, 6, {"w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006.pt", "step_00000006.pt.sha256"]


@pytest.mark.skipif(os.name != "posix", reason="directories cannot be opened, hence flushed, on Windows")
def test_the_rename_is_flushed_to_the_directory_before_older_checkpoints_are_pruned(tmp_path, monkeypatch):
    """The file was flushed but not the directory entry of its rename: after a power loss the folder could
    list the checkpoint before, whose own predecessor the pruning had already deleted."""
    from iris_pipelines.training import checkpoint

    flushed = []
    real_fsync = os.fsync

    def fsync(handle):
        info = os.fstat(handle)
        if stat.S_ISDIR(info.st_mode):
            names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
            flushed.append((info.st_ino, names))
        real_fsync(handle)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    for step in range(1, KEEP_LAST + 2):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)})
    inode, names = flushed[-1]
    # twice per save: after the rename of the digest, then after the checkpoint's
    assert inode == tmp_path.stat().st_ino and len(flushed) == 2 * (KEEP_LAST + 1)
    # flushed with the new checkpoint in place and the oldest not yet pruned
    assert names == [f"step_{step:08d}.pt" for step in range(1, KEEP_LAST + 2)]


def _flip_bytes_inside_a_tensor(path):
    """Bit rot or a bad copy in the middle of the largest tensor's data: the zip's CRCs would catch it,
    but torch.load does not check them."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # the local header: 30 bytes, then its own name and extra field (torch pads the latter to align data)
    name_length, extra_length = struct.unpack(
        "<HH", raw[record.header_offset + 26 : record.header_offset + 30]
    )
    data_start = record.header_offset + 30 + name_length + extra_length
    for offset in range(data_start + record.file_size // 2, data_start + record.file_size // 2 + 16):
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_checkpoint_whose_bytes_changed_after_the_write_falls_back_to_the_one_before(tmp_path, caplog):
    """Before, the flipped bytes loaded silently as other weights and a run resumed from them."""
    save_checkpoint(tmp_path, 2, {"w": torch.arange(4096.0)})
    newest = save_checkpoint(tmp_path, 4, {"w": torch.arange(4096.0)})
    _flip_bytes_inside_a_tensor(newest)
    path, payload = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000002.pt" and torch.equal(payload["w"], torch.arange(4096.0))
    assert f"training checkpoint {newest} is corrupted" in caplog.text
    assert "trying the checkpoint before it" in caplog.text
    with pytest.raises(RuntimeError, match=r"step_00000004\.pt is corrupted: its bytes hash to sha256"):
        load_checkpoint(newest)


def test_each_checkpoint_has_the_sha256_of_its_bytes_beside_it_and_pruning_removes_both(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"w": torch.ones(2) * step})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000004.pt",
        "step_00000004.pt.sha256",
        "step_00000006.pt",
        "step_00000006.pt.sha256",
    ]
    newest = latest_checkpoint(tmp_path)
    expected = hashlib.sha256(newest.read_bytes()).hexdigest()
    assert (
        newest.with_name(newest.name + ".sha256").read_text() == f"{expected}  step_00000006.pt\n"
    )  # as sha256sum writes it


def test_a_checkpoint_written_before_digests_loads_with_a_warning(tmp_path, caplog):
    """Runs started before this change must still resume; they are told the file went unchecked."""
    path = save_checkpoint(tmp_path, 2, {"w": torch.ones(2)})
    path.with_name(path.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert f"training checkpoint {path} cannot be verified" in caplog.text


def test_a_checkpoint_lacking_keys_falls_back_to_the_one_before(tmp_path, caplog):
    """Before, a readable file of other code was resumed from and failed on a bare KeyError."""
    save_checkpoint(tmp_path, 2, {"model": {}, "optimizer": {}})
    newest = save_checkpoint(tmp_path, 4, {"model": {}})
    path, _ = load_latest_checkpoint(tmp_path, required_keys=("model", "optimizer"))
    assert path.name == "step_00000002.pt"
    assert f"training checkpoint {newest} lacks ['optimizer']" in caplog.text
