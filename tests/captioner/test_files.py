import os
import stat

import pytest

from captioner.files import atomic_path, write_atomically


def test_write_atomically_replaces_the_whole_file(tmp_path):
    target = tmp_path / "new" / "folder" / "out.json"
    write_atomically(target, "first")
    write_atomically(target, [b"sec", b"ond"])
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["out.json"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def chunks():
        yield b"half of the new"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, chunks())
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_is_a_fresh_file_beside_the_target_and_cleaned_up_on_interrupt(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary != target
            temporary.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not target.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_the_written_file_has_the_umask_permissions_not_0600(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "shared.pt", b"x")
        assert os.umask(umask) == umask  # reading it left it as it was
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.pt").stat().st_mode) == mode
